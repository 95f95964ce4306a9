"""Models that noisewise did not train, wrapped so that prediction, calibration and serving use them like any
version: TorchScript archives, ``torch.export`` programs, and known architectures with safetensors weights.

Sources (:func:`check_source`), never a pickle:

- **TorchScript** (``torch.jit.save``), read with ``torch.jit.load``: the code in the archive is TorchScript,
  compiled by torch, and its tensors are read by TorchScript's own loader, which knows tensors and TorchScript
  types only. An archive that exports ``forward_features(x) -> f [N, D]`` and ``forward_head(f) -> logits
  [N, K]`` (``@torch.jit.export``) gives features, so feature-space OOD scores (KNN, Mahalanobis, ...) work;
  otherwise ``forward(x) -> logits`` is all there is and the model is *logits-only*.
- **torch.export programs** (``.pt2``, ``torch.export.save``), read with ``torch.export.load`` after the archive
  is checked record by record: tensors stored with pickle, pickled or opaque objects and native code
  (AOTInductor) are refused, and the example inputs (always a pickle) are dropped before torch reads the
  archive. A program exports one method, so programs are logits-only. Torch still parses the program's graph
  (including its symbolic shape expressions): import programs from sources you trust, as for any code.
- **Known architectures** (``torchvision:resnet18``, ``timm:NAME``) with a ``.safetensors`` weights file;
  torchvision and timm are optional extras, imported only when asked for. The split is known: a torchvision
  ResNet's features are everything up to ``avgpool`` + ``flatten`` and its head is ``fc``; a timm model's
  features are ``forward_head(forward_features(x), pre_logits=True)`` and its head ``get_classifier()``.

``.pt``/``.pth``/``.pkl`` files written by ``torch.save`` or ``pickle`` are refused: unpickling runs any code the
file names.

Preprocessing is part of the version (``ModelSpec.preprocess``). A version takes inputs shaped like the items
of the dataset it was calibrated on (``ModelSpec.input_shape``, values in [0, 1]); the wrapper turns them into
what the network takes: channels (grey repeated to RGB, RGB to grey by ITU-R 601 luma), size (bilinear resize
to ``H x W``, or torchvision's ``Resize(S)`` + ``CenterCrop(H, W)``) and ``(x - mean) / std`` per channel.
Served inputs go through exactly the steps the calibration inputs went through, which is what keeps them
exchangeable with them (the assumption of every guarantee).

A logits-only model has ``logits_only = True``: ``forward_features`` returns the logits and ``forward_head`` is
the identity, so nothing downstream changes, and only logit OOD scorers (:data:`LOGITS_SCORERS`) are allowed.
"""

from __future__ import annotations

import hashlib
import importlib
import io
import json
import math
import zipfile
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from noisewise.models.nets import Classifier

#: ``ModelSpec.arch`` of imported archives; known architectures are ``torchvision:NAME`` and ``timm:NAME``.
ARCHIVE_KINDS = ("torchscript", "export")
ARCH_KINDS = ("torchvision", "timm")
#: File name of the original archive inside a version.
ARCHIVE_FILES = {"torchscript": "model.torchscript", "export": "program.pt2"}
#: OOD scorers that read the logits only (the only ones a logits-only model can use).
LOGITS_SCORERS = ("energy", "maxlogit", "msp")
#: How to install an optional extra.
EXTRAS = {kind: f"pip install 'noisewise[{kind}]'" for kind in ARCH_KINDS}
#: Suffixes of pickle files (torch.save, pickle, joblib): refused whatever their content.
PICKLE_SUFFIXES = (".pt", ".pth", ".pkl", ".pickle", ".ckpt", ".joblib")
#: torchvision architectures whose features/head split is known (the ResNet family: ``fc`` after ``avgpool``).
TORCHVISION_PREFIXES = ("resnet", "resnext", "wide_resnet")
#: Defaults for torchvision weights (every torchvision classification checkpoint uses them).
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
#: RGB -> grey (ITU-R BT.601 luma, as PIL's convert("L")).
_LUMA = (0.299, 0.587, 0.114)


class ImportedModelError(ValueError):
    """A model file or an option that cannot be imported (one line, ready to show)."""


def is_imported(arch: str) -> bool:
    """Whether ``ModelSpec.arch`` names an imported model."""
    return arch in ARCHIVE_KINDS or arch.partition(":")[0] in ARCH_KINDS


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


# --- what a file is -------------------------------------------------------------------------------
def sniff(path: Path) -> str:
    """``torchscript``, ``export``, ``safetensors``, ``pickle`` or ``unknown``, from the file's content.

    TorchScript archives and ``.pt2`` programs are zip files with a known layout (``code/`` +
    ``constants.pkl``; ``archive_format``); a zip with only ``data.pkl`` is a ``torch.save`` pickle; a file
    starting with the pickle opcode ``PROTO`` (0x80) is a pickle; safetensors starts with an 8-byte
    little-endian header length followed by a JSON object.
    """
    with open(path, "rb") as f:
        head = f.read(16)
    if head[:4] == b"PK\x03\x04":
        try:
            with zipfile.ZipFile(path) as archive:
                names = archive.namelist()
        except zipfile.BadZipFile:
            return "unknown"
        if any("/code/" in n for n in names) and any(n.endswith("constants.pkl") for n in names):
            return "torchscript"
        if any(n.endswith("/archive_format") or n == "archive_format" for n in names):
            return "export"
        if any(n.endswith("data.pkl") for n in names):
            return "pickle"
        return "unknown"
    if head[:1] == b"\x80":
        return "pickle"
    if len(head) >= 9:
        size = int.from_bytes(head[:8], "little")
        if head[8:9] == b"{" and 0 < size <= path.stat().st_size - 8:
            return "safetensors"
    return "unknown"


_PICKLE_WHY = ("it is a pickle (torch.save / pickle): loading it would run arbitrary code from the file, so "
               "noisewise refuses it. Save the weights with safetensors "
               "(safetensors.torch.save_file(model.state_dict(), 'model.safetensors')) and give --arch, or export "
               "the model with torch.jit.save (TorchScript) or torch.export.save (.pt2)")


@dataclass(frozen=True)
class Source:
    """A checked model file: what it is, where, and its sha256."""

    kind: str  # torchscript | export | torchvision | timm
    path: Path
    sha256: str
    name: str | None = None  # architecture name for torchvision/timm

    @property
    def arch(self) -> str:
        return self.kind if self.name is None else f"{self.kind}:{self.name}"


def check_source(model: str | Path | None = None, arch: str | None = None,
                 weights: str | Path | None = None) -> Source:
    """Check what is to be imported before any data is loaded: the file exists, is not a pickle, and an
    optional extra that ``arch`` needs is installed.

    Parameters
    ----------
    model : path, optional
        A TorchScript archive or a ``.pt2`` program.
    arch : str, optional
        ``torchvision:NAME`` or ``timm:NAME`` (with ``weights``), instead of ``model``.
    weights : path, optional
        A ``.safetensors`` file for ``arch``.
    """
    if arch is not None:
        if model is not None:
            raise ImportedModelError("MODEL and --arch exclude each other: MODEL is a TorchScript archive or a .pt2 "
                                     "program; with --arch the weights come from --weights FILE.safetensors")
        kind, _, name = arch.partition(":")
        if kind not in ARCH_KINDS or not name:
            raise ImportedModelError(f"--arch: expected torchvision:NAME or timm:NAME, got {arch!r}")
        if kind == "torchvision" and not name.startswith(TORCHVISION_PREFIXES):
            raise ImportedModelError(f"--arch: torchvision:{name} is not supported: the features/head split is known "
                                     "for the ResNet family (resnet*, resnext*, wide_resnet*); export other models "
                                     "as TorchScript with forward_features/forward_head")
        if weights is None:
            raise ImportedModelError(f"--arch {arch} needs --weights FILE.safetensors")
        path = _existing(weights, "--weights")
        what = "pickle" if path.suffix.lower() in PICKLE_SUFFIXES else sniff(path)
        if what != "safetensors":
            raise ImportedModelError(f"--weights: {path.name}: " + (_PICKLE_WHY if what == "pickle" else
                                     "not a safetensors file"))
        require_extra(kind, f"--arch {arch}")
        return Source(kind, path, _sha256_file(path), name)
    if weights is not None:
        raise ImportedModelError("--weights goes with --arch torchvision:NAME or timm:NAME")
    if model is None:
        raise ImportedModelError("give MODEL (a TorchScript archive or a .pt2 torch.export program), or --arch "
                                 "torchvision:NAME|timm:NAME with --weights FILE.safetensors")
    path = _existing(model, "MODEL")
    what = sniff(path)
    if what in ARCHIVE_KINDS:
        return Source(what, path, _sha256_file(path))
    if what == "safetensors":
        raise ImportedModelError(f"MODEL: {path.name} is a safetensors weights file: give its architecture with "
                                 "--arch torchvision:NAME or timm:NAME and the file as --weights")
    if what == "pickle" or path.suffix.lower() in (".pkl", ".pickle", ".joblib"):
        raise ImportedModelError(f"MODEL: {path.name}: {_PICKLE_WHY}")
    raise ImportedModelError(f"MODEL: {path.name} is not a TorchScript archive (torch.jit.save) or a torch.export "
                             "program (torch.export.save, .pt2)")


def require_extra(kind: str, who: str):
    """Import the optional extra ``torchvision`` (its ``models``) or ``timm``, or say how to install it; ``who``
    names what needs it (``--arch timm:NAME``, a stored version's architecture)."""
    try:
        return importlib.import_module("torchvision.models" if kind == "torchvision" else kind)
    except ImportError:
        raise ImportedModelError(f"{who}: {kind} is not installed; install the extra: {EXTRAS[kind]}") from None


def _existing(path: str | Path, flag: str) -> Path:
    path = Path(path).expanduser()
    if not path.is_file():
        raise ImportedModelError(f"{flag}: no such file {str(path)!r}")
    return path


def _sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


# --- preprocessing --------------------------------------------------------------------------------
@dataclass(frozen=True)
class Preprocess:
    """From a version's input (dataset-shaped, in [0, 1]) to what the network takes.

    Attributes
    ----------
    input_shape : tuple of int
        What the network takes: ``(C, H, W)`` for images, ``(D,)`` for vectors.
    resize : int or None
        Images: resize the shorter side to ``resize`` then center-crop ``H x W`` (torchvision's
        ``Resize(resize)`` + ``CenterCrop``); None: resize straight to ``H x W`` (bilinear) when the sizes differ.
    mean, std : tuple of float or None
        Per network channel (images) or per feature (vectors), applied after the resize: ``(x - mean) / std``;
        None: the network gets values in [0, 1].
    """

    input_shape: tuple[int, ...]
    resize: int | None = None
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None

    def to_dict(self) -> dict[str, Any]:
        return {k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(self).items()}

    @classmethod
    def from_dict(cls, data: dict) -> Preprocess:
        try:
            return cls(input_shape=tuple(int(s) for s in data["input_shape"]),
                       resize=None if data.get("resize") is None else int(data["resize"]),
                       mean=None if data.get("mean") is None else tuple(float(v) for v in data["mean"]),
                       std=None if data.get("std") is None else tuple(float(v) for v in data["std"]))
        except (KeyError, TypeError, ValueError) as err:
            raise ImportedModelError(f"model.json: malformed preprocess ({err!r})") from None

    def check(self, served_shape: Sequence[int]) -> None:
        """Refuse what the wrapper cannot do, naming the option at fault."""
        served, net = tuple(served_shape), self.input_shape
        if any(s < 1 for s in net):
            raise ImportedModelError(f"--input-shape: sizes must be positive, got {list(net)}")
        if len(net) != len(served):
            raise ImportedModelError(f"--input-shape: {list(net)} does not fit the dataset's items, shaped "
                                     f"{list(served)} (images take C,H,W, vectors D)")
        if len(net) == 3:
            if net[0] != served[0] and {net[0], served[0]} != {1, 3}:
                raise ImportedModelError(f"--input-shape: {served[0]} input channels cannot become {net[0]} (only "
                                         "grey <-> RGB)")
            if self.resize is not None and self.resize < max(net[1:]):
                raise ImportedModelError(f"--resize: {self.resize} is smaller than the crop {net[1]}x{net[2]}")
        else:
            if net != served:
                raise ImportedModelError(f"--input-shape: only images [C, H, W] are converted; the dataset's items "
                                         f"are {list(served)}, not {list(net)}")
            if self.resize is not None:
                raise ImportedModelError("--resize applies to images only")
        width = _stat_shape(net)[0]
        for flag, values in (("--mean", self.mean), ("--std", self.std)):
            if values is not None:
                if len(values) not in (1, width):
                    raise ImportedModelError(f"{flag}: give 1 or {width} values (one per network channel), got "
                                             f"{len(values)}")
                if not all(math.isfinite(v) for v in values):
                    raise ImportedModelError(f"{flag}: values must be finite")
        if self.std is not None and min(self.std) <= 0:
            raise ImportedModelError(f"--std: values must be > 0, got {list(self.std)}")

    def describe(self, served_shape: Sequence[int]) -> str:
        served, net = list(served_shape), list(self.input_shape)
        steps = []
        if len(net) == 3 and net[0] != served[0]:
            steps.append("grey repeated to RGB" if served[0] == 1 else "RGB to grey (luma)")
        if len(net) == 3 and (net[1:] != served[1:] or self.resize):
            steps.append(f"resize shorter side to {self.resize}, center-crop {net[1]}x{net[2]}" if self.resize
                         else f"resize {served[1]}x{served[2]} -> {net[1]}x{net[2]} (bilinear)")
        if self.mean is not None or self.std is not None:
            steps.append(f"(x - {list(self.mean or (0.0,))}) / {list(self.std or (1.0,))}")
        return f"{served} in [0, 1] -> {net}" + (": " + ", ".join(steps) if steps else " as is")


# --- the wrapper ----------------------------------------------------------------------------------
class ImportedModel(Classifier):
    """Base of the wrappers: the version's preprocessing, then the imported network's features and head.

    ``forward_features(x)`` takes ``[N, *input_shape]`` (the version's input) and returns ``[N, D]``;
    ``forward_head(f)`` returns the logits ``[N, K]``. Subclasses provide ``_features(z)`` on the network's
    input ``z`` and ``forward_head``.
    """

    arch: str = ""
    logits_only: bool = False
    archive: bytes | None = None  # the original archive/program, stored with the version

    def __init__(self, input_shape: Sequence[int], num_classes: int, preprocess: Preprocess):
        super().__init__(tuple(input_shape), num_classes)
        preprocess.check(self.input_shape)
        self.preprocess = preprocess
        stat_shape = _stat_shape(preprocess.input_shape)
        # the Classifier's standardization buffers, re-registered on the network's side of the conversion
        self.register_buffer("input_mean", _stat(preprocess.mean, 0.0, stat_shape))
        self.register_buffer("input_std", _stat(preprocess.std, 1.0, stat_shape))
        self.register_buffer("_luma", torch.tensor(_LUMA).view(1, 3, 1, 1), persistent=False)
        self._hidden: tuple[nn.Module, ...] = ()  # modules that must not be registered (see _apply)

    # nn.Module's recursion covers registered children only; archives and programs are held outside them
    # (an exported program refuses .eval(), and their weights live in the archive, not in weights.safetensors),
    # so moving and listing parameters reach them here
    def _apply(self, fn, recurse: bool = True):
        super()._apply(fn, recurse)
        for module in self._hidden:
            module._apply(fn)
        return self

    def parameters(self, recurse: bool = True):
        yield from super().parameters(recurse)
        for module in self._hidden:
            yield from module.parameters(recurse)

    def prepare(self, x: torch.Tensor) -> torch.Tensor:
        """The version's input ``[N, *input_shape]`` -> the network's input ``[N, *preprocess.input_shape]``."""
        net = self.preprocess.input_shape
        x = x.float()
        if x.ndim == 4:
            if x.shape[1] != net[0]:
                x = x.expand(-1, net[0], -1, -1) if x.shape[1] == 1 else (x * self._luma).sum(1, keepdim=True)
            x = _resize(x, net[1:], self.preprocess.resize)
        return (x - self.input_mean) / self.input_std

    standardize = prepare

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self._features(self.prepare(x))

    def _features(self, z: torch.Tensor) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def forward_head(self, features: torch.Tensor) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def linear_head(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        """``(weight [K, D], bias [K])`` of the final linear layer when the head is one (ViM and ReAct need it),
        else None."""
        return None

    @property
    def feature_dim(self) -> int:
        with torch.no_grad():
            return int(self.forward_features(torch.zeros(1, *self.input_shape, device=self.input_mean.device)).shape[1])

    def arch_kwargs(self) -> dict[str, Any]:
        """What :func:`load_imported` needs besides the weights (``ModelSpec.arch_kwargs``)."""
        kwargs: dict[str, Any] = {"logits_only": self.logits_only}
        if self.archive is not None:
            kwargs.update(archive=ARCHIVE_FILES[self.arch], sha256=sha256_bytes(self.archive))
        return kwargs

    def save_artifacts(self, directory: Path) -> dict[str, str]:
        """Write the original archive beside ``weights.safetensors``; MLflow artifact name -> path."""
        if self.archive is None:
            return {}
        path = Path(directory) / ARCHIVE_FILES[self.arch]
        path.write_bytes(self.archive)
        return {"archive": str(path)}

    def version_digest(self, weights_sha256: str) -> str:
        """Identity of what computes the outputs: equal digests give equal outputs (the weights file, the
        archive and the preprocessing)."""
        document = {"arch": self.arch, "weights": weights_sha256, "preprocess": self.preprocess.to_dict(),
                    "archive": None if self.archive is None else sha256_bytes(self.archive)}
        return sha256_bytes(json.dumps(document, sort_keys=True).encode())


def _stat_shape(net: Sequence[int]) -> tuple[int, ...]:
    """Shape of mean/std: per channel for images ``[C, 1, 1]``, per feature for vectors ``[D]``, one value
    for inputs of other ranks."""
    return (net[0], 1, 1) if len(net) == 3 else (net[0],) if len(net) == 1 else (1,)


def _stat(values: Sequence[float] | None, default: float, shape: tuple[int, ...]) -> torch.Tensor:
    """One value, or one per channel/feature, as a buffer of ``shape`` (``[C, 1, 1]`` or ``[D]``)."""
    if values is None:
        return torch.full(shape, default, dtype=torch.float32)
    column = torch.tensor(values, dtype=torch.float32).view(-1, *([1] * (len(shape) - 1)))
    return column.expand(shape).clone()


def _resize(x: torch.Tensor, size: Sequence[int], shorter: int | None) -> torch.Tensor:
    """``[N, C, h, w]`` -> ``[N, C, H, W]``: bilinear to ``H x W``, or shorter side to ``shorter`` then a
    center crop (antialiased when shrinking, as PIL and torchvision's tensor resize do)."""
    h, w = x.shape[-2:]
    height, width = int(size[0]), int(size[1])
    if shorter is None:
        if (h, w) == (height, width):
            return x
        return F.interpolate(x, size=(height, width), mode="bilinear", align_corners=False,
                             antialias=height < h or width < w)
    scale = shorter / min(h, w)
    nh, nw = max(height, round(h * scale)), max(width, round(w * scale))
    if (nh, nw) != (h, w):
        x = F.interpolate(x, size=(nh, nw), mode="bilinear", align_corners=False, antialias=nh < h or nw < w)
    top, left = (nh - height) // 2, (nw - width) // 2
    return x[..., top:top + height, left:left + width]


class ScriptModel(ImportedModel):
    """A TorchScript archive; features when it exports ``forward_features`` and ``forward_head``."""

    arch = "torchscript"

    def __init__(self, input_shape, num_classes, preprocess: Preprocess, archive: bytes):
        super().__init__(input_shape, num_classes, preprocess)
        try:
            module = torch.jit.load(io.BytesIO(archive), map_location="cpu")
        except Exception as err:  # torch raises RuntimeError subclasses with multi-line messages
            raise ImportedModelError(f"cannot load the TorchScript archive: {_first_line(err)}") from None
        module.eval()
        self.archive = archive
        self._hidden = (module,)
        self.logits_only = not (_has_method(module, "forward_features") and _has_method(module, "forward_head"))

    def _features(self, z):
        module = self._hidden[0]
        return module(z) if self.logits_only else module.forward_features(z)

    def forward_head(self, features):
        return features if self.logits_only else self._hidden[0].forward_head(features)

    def linear_head(self):
        """A submodule ``head``, ``fc`` or ``classifier`` with ``weight [K, D]`` and ``bias [K]``, accepted only
        when ``forward_head(f) == f W^T + b`` on random features (ViM and ReAct assume exactly that)."""
        if self.logits_only:
            return None
        module = self._hidden[0]
        for name in ("head", "fc", "classifier"):
            layer = getattr(module, name, None)
            weight, bias = getattr(layer, "weight", None), getattr(layer, "bias", None)
            if not (isinstance(weight, torch.Tensor) and isinstance(bias, torch.Tensor) and weight.ndim == 2
                    and bias.shape == (weight.shape[0],) and weight.shape[0] == self.num_classes):
                continue
            with torch.no_grad():
                f = torch.randn(8, weight.shape[1], generator=torch.Generator().manual_seed(0)).to(weight)
                try:
                    same = torch.allclose(module.forward_head(f), f @ weight.T + bias, rtol=1e-4, atol=1e-5)
                except Exception:
                    same = False
            if same:
                return weight.detach(), bias.detach()
        return None


class ProgramModel(ImportedModel):
    """A ``torch.export`` program: logits-only. A program exported with a fixed batch size runs in chunks of
    that size (the last one padded)."""

    arch = "export"
    logits_only = True

    def __init__(self, input_shape, num_classes, preprocess: Preprocess, archive: bytes):
        super().__init__(input_shape, num_classes, preprocess)
        program = _load_program(archive)
        self.archive = archive
        self._hidden = (program.module(),)
        self.static_batch = _static_batch(program)

    def _features(self, z):
        module, batch = self._hidden[0], self.static_batch
        if batch is None or len(z) == batch:
            return module(z)
        parts = []
        for start in range(0, len(z), batch):
            chunk = z[start:start + batch]
            n = len(chunk)
            if n < batch:  # pad with copies of the first row; their outputs are dropped
                chunk = torch.cat([chunk, chunk[:1].expand(batch - n, *chunk.shape[1:])])
            parts.append(module(chunk)[:n])
        return torch.cat(parts)

    def forward_head(self, features):
        return features


class TorchvisionResNet(ImportedModel):
    """A torchvision ResNet: features up to ``avgpool`` + ``flatten``, head ``fc``."""

    def __init__(self, input_shape, num_classes, preprocess: Preprocess, name: str, model: nn.Module):
        super().__init__(input_shape, num_classes, preprocess)
        self.arch = f"torchvision:{name}"
        self.model = model

    def _features(self, z):
        m = self.model
        z = m.maxpool(m.relu(m.bn1(m.conv1(z))))
        z = m.layer4(m.layer3(m.layer2(m.layer1(z))))
        return torch.flatten(m.avgpool(z), 1)

    def forward_head(self, features):
        return self.model.fc(features)

    def linear_head(self):
        fc = self.model.fc
        return (fc.weight.detach(), fc.bias.detach()) if isinstance(fc, nn.Linear) and fc.bias is not None else None


class TimmModel(ImportedModel):
    """A timm model: features ``forward_head(forward_features(x), pre_logits=True)``, head ``get_classifier()``."""

    def __init__(self, input_shape, num_classes, preprocess: Preprocess, name: str, model: nn.Module):
        super().__init__(input_shape, num_classes, preprocess)
        self.arch = f"timm:{name}"
        self.model = model

    def _features(self, z):
        return self.model.forward_head(self.model.forward_features(z), pre_logits=True)

    def forward_head(self, features):
        return self.model.get_classifier()(features)

    def linear_head(self):
        head = self.model.get_classifier()
        return (head.weight.detach(), head.bias.detach()) if isinstance(head, nn.Linear) and head.bias is not None else None


def _has_method(module, name: str) -> bool:
    try:
        return callable(getattr(module, name))
    except (AttributeError, RuntimeError):
        return False


def _first_line(err: BaseException) -> str:
    """The line that says what went wrong: TorchScript puts it last, after the interpreter's traceback."""
    lines = [line.strip() for line in str(err).strip().splitlines() if line.strip()]
    if not lines:
        return type(err).__name__
    if "TorchScript interpreter" in lines[0] or lines[0].startswith("Traceback"):
        return lines[-1].removeprefix("RuntimeError: ")
    return lines[0]


# --- torch.export programs without pickles --------------------------------------------------------
def _load_program(archive: bytes):
    """``torch.export.load`` of a ``.pt2`` whose every record is checked first (module docstring)."""
    from torch.export.pt2_archive._package import PT2ArchiveReader, PT2ArchiveWriter

    try:
        with PT2ArchiveReader(io.BytesIO(archive)) as reader:
            records = {name: reader.read_bytes(name) for name in reader.get_file_names()}
    except Exception as err:
        raise ImportedModelError(f"cannot read the .pt2 program: {_first_line(err)}") from None
    for name in records:
        if not _allowed_record(name):
            raise ImportedModelError(f"the .pt2 program holds {name!r}, which noisewise does not load (only the "
                                     "program, its weights and tensor constants: no pickled objects, no native code)")
    if "models/model.json" not in records:
        raise ImportedModelError("the .pt2 archive holds no program named 'model' (save it with torch.export.save)")
    for name in ("data/weights/model_weights_config.json", "data/constants/model_constants_config.json"):
        try:
            config = json.loads(records.get(name, b'{"config": {}}'))["config"]
        except (ValueError, KeyError, TypeError):
            raise ImportedModelError(f"the .pt2 program's {name} is malformed") from None
        for key, meta in config.items():
            if not isinstance(meta, dict) or meta.get("use_pickle") or not str(meta.get("path_name", "")).startswith(
                    ("weight_", "tensor_")):
                raise ImportedModelError(f"the .pt2 program stores {key!r} as a pickle; noisewise loads tensors "
                                         "only (re-save it with torch.export.save of a recent torch)")
    buffer = io.BytesIO()
    with PT2ArchiveWriter(buffer) as writer:
        for name, data in records.items():
            if name.startswith(".data/"):  # the writer's own bookkeeping
                continue
            # the example inputs are a pickle that torch falls back to unpickling without restrictions
            writer.write_bytes(name, b"" if name.startswith("data/sample_inputs/") else data)
    try:
        return torch.export.load(io.BytesIO(buffer.getvalue()))
    except Exception as err:
        raise ImportedModelError(f"cannot load the .pt2 program: {_first_line(err)}") from None


def _allowed_record(name: str) -> bool:
    import re

    return (name in ("archive_format", "archive_version", "byteorder", "models/model.json",
                     "data/weights/model_weights_config.json", "data/constants/model_constants_config.json",
                     "data/sample_inputs/model.pt")
            or name.startswith(".data/")
            or re.fullmatch(r"data/weights/weight_\d+", name) is not None
            or re.fullmatch(r"data/constants/tensor_\d+", name) is not None)


def _static_batch(program) -> int | None:
    """The batch size a program was exported with when it is not dynamic, else None."""
    inputs = set(program.graph_signature.user_inputs)
    for node in program.graph.nodes:
        if node.op == "placeholder" and node.name in inputs:
            value = node.meta.get("val")
            size = getattr(value, "shape", (None,))[0] if getattr(value, "ndim", 0) else None
            return size if isinstance(size, int) else None
    return None


# --- building ------------------------------------------------------------------------------------
def _weights_state(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    try:
        return load_file(str(path))
    except Exception as err:
        raise ImportedModelError(f"--weights: cannot read {path.name} as safetensors: {_first_line(err)}") from None


def _build_arch(kind: str, name: str, num_classes: int) -> nn.Module:
    lib = require_extra(kind, f"{kind}:{name}")
    try:
        if kind == "torchvision":
            return getattr(lib, name)(weights=None, num_classes=num_classes)
        return lib.create_model(name, pretrained=False, num_classes=num_classes)
    except AttributeError:
        raise ImportedModelError(f"--arch: {kind} has no architecture {name!r}") from None
    except Exception as err:  # timm raises RuntimeError for unknown names
        raise ImportedModelError(f"--arch {kind}:{name}: {_first_line(err)}") from None


def _arch_defaults(kind: str, model: nn.Module | None, served: tuple[int, ...]) -> tuple[tuple[int, ...], tuple | None, tuple | None]:
    """Default network input shape, mean and std: the dataset's shape (channels from the architecture when it
    says), ImageNet statistics for torchvision, the model's own config for timm, none for archives."""
    if kind == "torchvision":
        channels = int(getattr(getattr(model, "conv1", None), "in_channels", served[0]))
        return (channels, *served[1:]), IMAGENET_MEAN, IMAGENET_STD
    if kind == "timm":
        cfg = dict(getattr(model, "pretrained_cfg", None) or getattr(model, "default_cfg", None) or {})
        channels = int(cfg.get("input_size", (served[0],))[0]) if len(served) == 3 else served[0]
        mean, std = cfg.get("mean"), cfg.get("std")
        return ((channels, *served[1:]) if len(served) == 3 else served,
                None if mean is None else tuple(mean), None if std is None else tuple(std))
    return served, None, None


def import_model(source: Source, input_shape: Sequence[int], num_classes: int, *,
                 network_shape: Sequence[int] | None = None, resize: int | None = None,
                 mean: Sequence[float] | None = None, std: Sequence[float] | None = None,
                 probe: torch.Tensor | None = None) -> ImportedModel:
    """Wrap a checked :class:`Source` for a dataset whose items are ``input_shape`` with ``num_classes`` classes.

    Parameters
    ----------
    source : Source
        From :func:`check_source`.
    input_shape : tuple of int
        The dataset's item shape: what the version takes.
    num_classes : int
    network_shape, resize, mean, std
        ``--input-shape``, ``--resize``, ``--mean``, ``--std``; None: the defaults of :func:`_arch_defaults`.
    probe : Tensor [n, *input_shape], optional
        A few dataset items: the model must run on them and give ``[n, num_classes]`` logits and ``[n, D]``
        features, or the import is refused with the reason.
    """
    served = tuple(int(s) for s in input_shape)
    model = None
    if source.kind in ARCH_KINDS:
        model = _build_arch(source.kind, source.name, num_classes)
        try:
            model.load_state_dict(_weights_state(source.path), strict=True)
        except RuntimeError as err:
            raise ImportedModelError(f"--weights: {source.path.name} does not fit {source.arch} with {num_classes} "
                                     f"classes: {_first_line(err)}") from None
        model.eval()
    default_shape, default_mean, default_std = _arch_defaults(source.kind, model, served)
    preprocess = Preprocess(
        input_shape=tuple(int(s) for s in (network_shape or default_shape)), resize=resize,
        mean=tuple(float(v) for v in mean) if mean is not None else default_mean,
        std=tuple(float(v) for v in std) if std is not None else default_std)
    if source.kind in ARCHIVE_KINDS:
        net = build(source.kind, served, num_classes, preprocess, archive=source.path.read_bytes())
    else:
        cls = TorchvisionResNet if source.kind == "torchvision" else TimmModel
        net = cls(served, num_classes, preprocess, source.name, model)
    net.eval()
    if probe is not None:
        check_outputs(net, probe)
    return net


def build(arch: str, input_shape: Sequence[int], num_classes: int, preprocess: Preprocess, *,
          archive: bytes | None = None) -> ImportedModel:
    """The wrapper for ``arch`` (an archive kind with its bytes, or ``torchvision:NAME`` / ``timm:NAME`` with
    freshly initialised weights that the caller then loads)."""
    if arch == "torchscript":
        return ScriptModel(input_shape, num_classes, preprocess, archive)
    if arch == "export":
        return ProgramModel(input_shape, num_classes, preprocess, archive)
    kind, _, name = arch.partition(":")
    if kind not in ARCH_KINDS or not name:
        raise ImportedModelError(f"unknown imported architecture {arch!r}")
    cls = TorchvisionResNet if kind == "torchvision" else TimmModel
    return cls(input_shape, num_classes, preprocess, name, _build_arch(kind, name, num_classes))


def check_outputs(net: ImportedModel, probe: torch.Tensor) -> None:
    """Run ``net`` on a few dataset items; refuse a model that fails on them or gives the wrong shapes."""
    net_shape = list(net.preprocess.input_shape)
    try:
        with torch.no_grad():
            features = net.forward_features(probe)
            logits = net.forward_head(features)
    except Exception as err:
        raise ImportedModelError(f"the model does not run on inputs shaped {net_shape} (the dataset's items "
                                 f"{list(net.input_shape)} after preprocessing): {_first_line(err)}; give the shape it "
                                 "takes with --input-shape") from None
    n = len(probe)
    if not isinstance(logits, torch.Tensor) or tuple(logits.shape) != (n, net.num_classes):
        got = list(logits.shape) if isinstance(logits, torch.Tensor) else type(logits).__name__
        raise ImportedModelError(f"the model gives {got} for {n} inputs; expected logits [{n}, {net.num_classes}] "
                                 f"(one per class of the dataset)")
    if not isinstance(features, torch.Tensor) or features.ndim != 2 or len(features) != n:
        got = list(features.shape) if isinstance(features, torch.Tensor) else type(features).__name__
        raise ImportedModelError(f"forward_features gives {got} for {n} inputs; expected features [{n}, D]")
    if not torch.isfinite(logits).all():
        raise ImportedModelError("the model gives non-finite logits on dataset items")


def load_imported(spec, directory: Path) -> ImportedModel:
    """Rebuild the wrapper of a stored version (``spec``: its ``ModelSpec``); the archive must match the sha256
    recorded in ``model.json``. The caller loads ``weights.safetensors`` into it."""
    preprocess = Preprocess.from_dict(spec.preprocess or {"input_shape": spec.input_shape})
    archive = None
    if spec.arch in ARCHIVE_KINDS:
        name, expected = spec.arch_kwargs.get("archive"), spec.arch_kwargs.get("sha256")
        if name != ARCHIVE_FILES[spec.arch] or not expected:
            raise ImportedModelError(f"model.json: an imported {spec.arch} model needs arch_kwargs.archive "
                                     f"{ARCHIVE_FILES[spec.arch]!r} and its sha256")
        path = Path(directory) / name
        if not path.is_file():
            raise ImportedModelError(f"model artifacts in {directory} lack {name}")
        archive = path.read_bytes()
        if sha256_bytes(archive) != expected:
            raise ImportedModelError(f"{name} does not match the sha256 recorded in model.json (tampered or corrupted "
                                     "artifact)")
    return build(spec.arch, spec.input_shape, len(spec.class_names), preprocess, archive=archive)
