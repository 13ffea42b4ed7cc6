"""The image tasks' fixed front end (issue 13): a parameter-free scattering transform,
standardised with constants from public images only, then one trained Linear layer."""

from __future__ import annotations

import math
import runpy
from pathlib import Path

import numpy as np
import pytest
import torch

from fl_client.linear_dp import linear_head
from fl_models import fixed_features
from fl_models.fixed_features import GaborScattering, feature_scale, linear_on, morlet_kernels
from fl_models.glaucoma import scale_constants as glaucoma_constants
from fl_models.glaucoma.dataset import to_tensors
from fl_models.glaucoma.synthetic import generate as generate_fundus
from fl_models.imaging import write_class_folders
from fl_models.pneumonia import scale_constants as pneumonia_constants
from fl_models.pneumonia.model import front_end as pneumonia_front_end
from fl_models.pneumonia.synthetic import generate as generate_films
from fl_models.registry import get_task

CONSTANTS = {"glaucoma": glaucoma_constants, "pneumonia": pneumonia_constants}


def _fresh(name: str, n: int, seed: int) -> torch.Tensor:
    if name == "glaucoma":
        images = generate_fundus(n, seed)[0]
        return to_tensors(images, np.zeros(n, dtype=np.int64)).tensors[0]
    return torch.from_numpy(generate_films(n, seed)[0]).unsqueeze(1).float() / 255


@pytest.mark.parametrize("name", ["glaucoma", "pneumonia"])
def test_scaling_is_the_public_images_and_is_not_sent(name: str) -> None:
    """The shipped constants are what the seeded public images give (so no hospital's
    images went into them), they standardise fresh images of the same kind, and they
    stay out of the state dict: only the head is trained, noised, averaged and sent."""
    task = get_task(name)
    module = __import__(f"fl_models.{name}.model", fromlist=["public_feature_scale"])
    mean, scale = module.public_feature_scale()
    np.testing.assert_allclose(CONSTANTS[name].MEAN, mean, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(CONSTANTS[name].SCALE, scale, rtol=1e-4, atol=1e-6)
    model = task.build_model()
    assert set(model.state_dict()) == {"2.weight", "2.bias"}
    assert [n for n, _ in model.named_parameters()] == ["2.weight", "2.bias"]
    assert not any(model.state_dict()[k].any() for k in ("2.weight", "2.bias"))  # zero start
    with torch.no_grad():
        scaled = model[1](model[0](_fresh(name, 80, 31)))
    assert scaled.shape == (80, module.FEATURES)
    assert scaled.mean(dim=0).abs().median() < 0.3
    assert (scaled.std(dim=0) - 1).abs().median() < 0.3


@pytest.mark.parametrize(("name", "features"), [("glaucoma", 114), ("pneumonia", 400)])
def test_image_models_take_the_closed_form_dp_step(name: str, features: int) -> None:
    task = get_task(name)
    model = task.build_model()
    head = linear_head(model, task.input_shape)
    assert head is not None and head.linear.in_features == features
    assert model(torch.rand(3, *task.input_shape)).shape == (3, len(task.class_names))


def test_filters_ignore_flat_regions_and_pick_the_orientation() -> None:
    """Zero-mean filters: a flat image has no response. A grating varying along x
    excites the filter whose wave runs along x (orientation 0) most, one along y the
    one at 90 degrees."""
    kernels = morlet_kernels(4)
    assert kernels.shape == (8, 1, 7, 7)
    assert kernels.sum(dim=(1, 2, 3)).abs().max() < 1e-6
    front = GaborScattering(1, levels=1, orientations=4, grid=1)
    x = torch.arange(64, dtype=torch.float32)
    for axis, best in ((1, 0), (0, 2)):
        grating = torch.cos(0.75 * math.pi * x)
        image = (grating[None, :] if axis == 1 else grating[:, None]).expand(64, 64)
        features = front(image[None, None].contiguous())[0]
        # [local mean, then the 4 orientations' mean modulus]
        assert int(features[1:].argmax()) == best
    flat = front(torch.full((1, 1, 64, 64), 0.3))[0]
    assert flat[1:].abs().max() < 1e-3  # moduli (the 1e-8 under the root aside)


def test_features_are_per_image_chunked_and_exposure_free() -> None:
    """Each image's features depend on it alone (the filter bank runs in chunks on a
    full-batch step) and not on its exposure or contrast (standardised per image)."""
    assert GaborScattering(3, levels=3, orientations=6, grid=2,
                           global_max=True).out_features == 3 * 19 * 5
    front = GaborScattering(1, levels=2, orientations=4, grid=2, global_max=True)
    assert not list(front.parameters()) and not front.state_dict()
    images = torch.rand(fixed_features.CHUNK + 3, 1, 64, 64)
    batch = front(images)
    alone = torch.cat([front(images[i:i + 1]) for i in (0, fixed_features.CHUNK + 2)])
    torch.testing.assert_close(batch[[0, fixed_features.CHUNK + 2]], alone, atol=1e-5,
                               rtol=1e-5)
    torch.testing.assert_close(front(images[:4] * 0.5 + 0.2), batch[:4], atol=1e-4, rtol=1e-4)


def test_linear_on_wants_one_constant_per_feature() -> None:
    with pytest.raises(ValueError, match="expected 4 scaling constants"):
        linear_on(torch.nn.Flatten(), 4, [0.0] * 3, [1.0] * 3, 2)


def test_constants_recompute_from_a_folder_of_public_images(tmp_path: Path) -> None:
    """What a site with real films runs: the constants from public class folders,
    written as a module the model can load."""
    images, labels, _ = generate_films(24, 5)
    write_class_folders(tmp_path / "public", images, labels, np.arange(24),
                        ("normal", "pneumonia"))
    out = tmp_path / "constants.py"
    fixed_features.main(["pneumonia", "--images", str(tmp_path / "public"), "--out", str(out)])
    written = runpy.run_path(str(out))
    assert "24 public images under" in " ".join(str(written["__doc__"]).split())
    inputs = torch.from_numpy(images).unsqueeze(1).float() / 255
    mean, scale = feature_scale(pneumonia_front_end(), inputs)
    np.testing.assert_allclose(written["MEAN"], mean, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(written["SCALE"], scale, rtol=1e-5, atol=1e-6)
    assert len(written["MEAN"]) == 400
