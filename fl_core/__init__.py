"""What the server and client daemons share: codec, sealing, TLS, constants."""
