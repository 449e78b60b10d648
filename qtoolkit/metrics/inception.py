"""InceptionV3 features as in pytorch-fid: the network and weights that published FIDs use.

The architecture comes from pytorch-fid (which builds on torchvision); the weights
(pt_inception-2015-12-05-6726825d.pth, ported from TensorFlow's FID graph) are read from a local
file with torch.load(weights_only=True). Images are preprocessed as pytorch-fid does: grayscale
repeated to 3 channels, bilinear resize to 299x299, values in [-1, 1].

Features are the 2048-d final average pool. The weights also hold the graph's 1008-way fc layer,
which gives the class probabilities for the Inception Score; like the original IS code (and
torch-fidelity's 'logits_unbiased') we use its weight matrix without the bias.
"""

from __future__ import annotations

import pickle
from contextlib import contextmanager
from pathlib import Path

import torch
import torch.nn.functional as F

from ..errors import QtoolkitError
from .features import FeatureExtractor

WEIGHTS_FILENAME = "pt_inception-2015-12-05-6726825d.pth"
INCEPTION_SIZE = 299
_INSTALL = "install it with `pip install -c constraints.txt pytorch-fid` (it brings torchvision)"


def cached_weights_path() -> Path:
    """Where pytorch-fid's own download lands, and where we look when no path is given."""
    return Path(torch.hub.get_dir()) / "checkpoints" / WEIGHTS_FILENAME


def _import_pytorch_fid():
    try:
        from pytorch_fid import inception
    except ImportError as e:
        raise QtoolkitError(f"--features inception needs the pytorch-fid package, which failed to import ({e}): "
                          f"{_INSTALL}; or use --features classifier") from None
    return inception


def _download(url: str, destination: Path) -> None:
    destination.parent.mkdir(parents=True, exist_ok=True)
    try:
        torch.hub.download_url_to_file(url, str(destination), progress=True)
    except OSError as e:  # URLError and socket errors are OSErrors: offline, proxy, DNS
        raise QtoolkitError(
            f"InceptionV3 weights are not in {destination} and downloading them failed ({e}): "
            f"fetch {url} on a machine with internet and put it there, or pass its path (--inception-weights)"
        ) from None


@contextmanager
def _weights_from(inception, state_dict: dict):
    # pytorch-fid's fid_inception_v3() builds the patched FID architecture and then fetches its
    # weights by URL. Redirecting that one call to our state dict reuses its architecture as is.
    original = inception.load_state_dict_from_url
    inception.load_state_dict_from_url = lambda *args, **kwargs: state_dict
    try:
        yield
    finally:
        inception.load_state_dict_from_url = original


class InceptionFeatures(FeatureExtractor):
    """2048-d pool features and 1008-class probabilities of pytorch-fid's FID InceptionV3."""

    name = "inception"

    def __init__(self, weights_path: str | Path | None = None, batch_size: int = 50,
                 device: str | torch.device | None = None, progress: bool = True):
        super().__init__(batch_size, device, progress)
        if weights_path is not None and not Path(weights_path).is_file():
            raise QtoolkitError(f"InceptionV3 weights file {weights_path} not found: pass the path of "
                              f"{WEIGHTS_FILENAME} (from pytorch-fid's releases), or omit it to use "
                              f"{cached_weights_path()}")
        fid_inception = _import_pytorch_fid()
        path = Path(weights_path) if weights_path is not None else cached_weights_path()
        if not path.is_file():
            _download(fid_inception.FID_WEIGHTS_URL, path)
        try:
            state_dict = torch.load(path, map_location="cpu", weights_only=True)
            with _weights_from(fid_inception, state_dict):
                network = fid_inception.fid_inception_v3()
        except (RuntimeError, KeyError, TypeError, EOFError, pickle.UnpicklingError) as e:
            # The type is enough: torch's own messages run to paragraphs (missing keys, weights_only advice).
            raise QtoolkitError(f"{path} does not hold pytorch-fid's FID InceptionV3 weights ({type(e).__name__}): "
                              f"replace it with {WEIGHTS_FILENAME}") from None
        # Keep fc's weights for the IS logits and end the network at the pool features.
        self.logit_weight = network.fc.weight.detach().to(self.device)
        network.fc = torch.nn.Identity()
        self.network = network.to(self.device).eval()

    def embed(self, batch: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if batch.shape[1] == 1:
            batch = batch.repeat(1, 3, 1, 1)
        batch = F.interpolate(batch, size=(INCEPTION_SIZE, INCEPTION_SIZE), mode="bilinear", align_corners=False)
        pool = self.network(batch)
        return pool, pool @ self.logit_weight.T
