"""The medical models a federation can train, behind one small interface.

`fl_models.registry.get_task(name)` is the only entry point the client and server
daemons need; each task lives in its own sub-package (see fl_models/README.md).
"""
