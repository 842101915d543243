"""The VQGAN encoder (Esser et al. 2021, taming-transformers), the tokenizer of the Toto paper's scaling study.

    tokenizer = load_vqgan_tokenizer("vqgan_imagenet_f16_1024")   # a released folder, a .ckpt or a .safetensors
    codes = tokenizer.encode(frames)              # [N, 3, H, W] in [0, 1] -> [N, H/16, W/16] for ch_mult of 5 levels

The network and its hyper-parameters: model/vqgan_net.py. Pixels go in mapped to [-1, 1].

Files: the released models are folders `checkpoints/last.ckpt` (a Lightning checkpoint whose
"state_dict" holds the whole VQModel: encoder, decoder, loss) + `configs/model.yaml` (the
hyper-parameters, model.params). A single .ckpt or .safetensors has its hyper-parameters read
from its weights' shapes (a converted file: from its metadata). Our state dict keeps taming's
names (`encoder.*`, `quant_conv.*`, `quantize.embedding.weight`); `totobench convert vqgan PATH`
writes it as safetensors with the hyper-parameters in the metadata, and the sha256 of
`weights_bytes(state_dict)` is the tokenizer's `sha256`, the same from every file form.
"""

from __future__ import annotations

import functools
import json
import pickle
import sys
import types
import warnings
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
import yaml
from safetensors import SafetensorError, safe_open
from safetensors.torch import save as save_safetensors_bytes

from totobench.errors import CheckpointError
from totobench.io import atomic_write
from totobench.model.checkpoint import sha256_bytes, weights_bytes
from totobench.model.dvae import PICKLED_DATA, ForbiddenGlobal, first_line
from totobench.model.vqgan_net import ENCODER_PREFIXES, METADATA_KEY, VQGANConfig, VQGANTokenizer, positive_int

def weight_shape(tensors: dict[str, torch.Tensor], key: str, ndim: int, path: Path) -> torch.Size:
    """The shape of `tensors[key]`, which must have `ndim` dimensions, all positive.
    Raises CheckpointError naming `path` when the key is absent or the shape is not so."""
    if key not in tensors:
        raise CheckpointError(f"{path}: not a taming VQGAN (missing {key})")
    shape = tensors[key].shape
    if len(shape) != ndim or 0 in shape:
        raise CheckpointError(f"{path}: {key} has shape {list(shape)}, expected {ndim} positive dimensions")
    return shape


def infer_config(tensors: dict[str, torch.Tensor], path: Path) -> VQGANConfig:
    """The hyper-parameters that weights in taming names imply: ch from conv_in, one level per
    `encoder.down.{i}.block.0`, ch_mult from their widths, num_res_blocks from level 0's blocks,
    attention where `encoder.down.{i}.attn.0` exists, z_channels, embed_dim and n_embed from
    conv_out, quant_conv and the codebook. Raises CheckpointError naming `path` for a key that
    is absent or a width that is no multiple of ch."""
    stem = weight_shape(tensors, "encoder.conv_in.weight", 4, path)
    if list(stem[1:]) != [3, 3, 3]:
        raise CheckpointError(f"{path}: encoder.conv_in.weight has shape {list(stem)}, expected [ch, 3, 3, 3]")
    ch, levels, blocks = stem[0], 1, 1
    while f"encoder.down.{levels}.block.0.conv1.weight" in tensors:
        levels += 1
    while f"encoder.down.0.block.{blocks}.conv1.weight" in tensors:
        blocks += 1
    ch_mult = []
    for i in range(levels):
        key = f"encoder.down.{i}.block.0.conv1.weight"
        width = weight_shape(tensors, key, 4, path)[0]
        if width % ch:
            raise CheckpointError(f"{path}: {key} has {width} output channels, expected a multiple of "
                                  f"ch = {ch} (the output channels of encoder.conv_in.weight)")
        ch_mult.append(width // ch)
    config = VQGANConfig(
        ch=ch, ch_mult=tuple(ch_mult), num_res_blocks=blocks,
        attn_levels=tuple(i for i in range(levels) if f"encoder.down.{i}.attn.0.q.weight" in tensors),
        z_channels=weight_shape(tensors, "encoder.conv_out.weight", 4, path)[0],
        embed_dim=weight_shape(tensors, "quant_conv.weight", 4, path)[0],
        n_embed=weight_shape(tensors, "quantize.embedding.weight", 2, path)[0])
    if config.problem():
        raise CheckpointError(f"{path}: the weights' shapes give an unbuildable encoder ({config.problem()})")
    return config


# taming ddconfig fields our encoder has one value for: field -> (taming's default, the value needed, why)
FIXED_DDCONFIG = {
    "in_channels": (None, 3, "RGB frames"),
    "double_z": (True, False, "a VQGAN's encoder outputs z_channels, not a mean and a variance"),
    "resamp_with_conv": (True, True, "a strided conv between levels"),
}


def config_from_yaml(params: dict, path: Path) -> VQGANConfig:
    """The hyper-parameters in `params` (model.params of a taming config file `path`): ddconfig
    {ch, ch_mult, num_res_blocks, attn_resolutions, resolution, z_channels, in_channels, double_z},
    n_embed, embed_dim. Raises CheckpointError naming the file and the field that is missing or
    has a value our encoder cannot take."""
    dd = params.get("ddconfig")
    if not isinstance(dd, dict):
        raise CheckpointError(f"{path}: model.params.ddconfig is missing or not a mapping")
    values: dict[str, Any] = {}
    for where, table, key in (("model.params.ddconfig", dd, "ch"), ("model.params.ddconfig", dd, "num_res_blocks"),
                              ("model.params.ddconfig", dd, "z_channels"), ("model.params.ddconfig", dd, "resolution"),
                              ("model.params", params, "n_embed"), ("model.params", params, "embed_dim")):
        values[key] = table.get(key)
        if not positive_int(values[key]):
            raise CheckpointError(f"{path}: {where}.{key} is {values[key]!r}, expected a positive integer")
    ch_mult, attn = dd.get("ch_mult"), dd.get("attn_resolutions")
    if not (isinstance(ch_mult, list) and ch_mult and all(map(positive_int, ch_mult))):
        raise CheckpointError(f"{path}: model.params.ddconfig.ch_mult is {ch_mult!r}, expected a list of "
                              f"positive integers")
    if not (isinstance(attn, list) and all(isinstance(r, int) for r in attn)):
        raise CheckpointError(f"{path}: model.params.ddconfig.attn_resolutions is {attn!r}, expected a list "
                              f"of integers")
    for key, (default, needed, why) in FIXED_DDCONFIG.items():
        value = dd.get(key, default)
        if (type(value), value) != (type(needed), needed):
            raise CheckpointError(f"{path}: model.params.ddconfig.{key} is {value!r}, expected "
                                  f"{json.dumps(needed)} ({why})")
    config = VQGANConfig(
        ch=values["ch"], ch_mult=tuple(ch_mult), num_res_blocks=values["num_res_blocks"],
        # level i works at resolution // 2**i; taming adds attention where that is in attn_resolutions
        attn_levels=tuple(i for i in range(len(ch_mult)) if values["resolution"] // 2 ** i in attn),
        z_channels=values["z_channels"], embed_dim=values["embed_dim"], n_embed=values["n_embed"])
    if config.problem():
        raise CheckpointError(f"{path}: model.params gives an unbuildable encoder ({config.problem()})")
    return config


def config_from_metadata(text: str, path: Path) -> VQGANConfig:
    """The hyper-parameters a converted file keeps in its metadata (JSON of VQGANConfig's fields).
    Raises CheckpointError naming `path` when they do not make a VQGANConfig."""
    try:
        fields: dict[str, Any] = {k: tuple(v) if isinstance(v, list) else v for k, v in json.loads(text).items()}
        config = VQGANConfig(**fields)
    except (json.JSONDecodeError, TypeError, AttributeError) as err:
        raise CheckpointError(f"{path}: metadata {METADATA_KEY!r} is not a VQGAN config ({first_line(err)})") from None
    if config.problem():
        raise CheckpointError(f"{path}: metadata {METADATA_KEY!r} gives an unbuildable encoder ({config.problem()})")
    return config


def check_weights(tensors: dict[str, torch.Tensor], expected: dict[str, torch.Size], path: Path,
                  source: str) -> None:
    """The encoder's weights in `tensors` (taming names) against the `expected` shapes, which
    `source` (a config file, or '' when they come from the weights) implies. Raises
    CheckpointError naming `path` for the first expected key (in the model's order) that is
    missing or mis-shaped, then for the first unexpected key."""
    for key, shape in expected.items():
        if key not in tensors:
            raise CheckpointError(f"{path}: missing {key}, which {source} implies" if source
                                  else f"{path}: not a complete taming VQGAN encoder (missing {key})")
        if tensors[key].shape != shape:
            raise CheckpointError(f"{path}: {key} has shape {list(tensors[key].shape)}, "
                                  f"{f'{source} implies' if source else 'expected'} {list(shape)}")
    for key in tensors:
        if key not in expected:
            raise CheckpointError(f"{path}: unexpected tensor {key}"
                                  + (f" ({source} implies none)" if source else
                                     " (not part of the taming VQGAN encoder the other weights describe)"))


# ---------------------------------------------------------------------- reading files
PICKLE_NOTICE = ("totobench: {path} is a pickle: loading it runs code from the file (limited to tensors, "
                 "Lightning's training state read as inert stand-ins); `totobench convert vqgan {src} --out "
                 "{out}` writes a safetensors copy that loads without pickles")

# packages whose objects a Lightning checkpoint holds besides the weights (callback states, configs,
# metric values); read as `TrainingState` stand-ins: never imported, their code never runs
TRAINING_STATE_PACKAGES = {"pytorch_lightning", "lightning", "lightning_fabric", "omegaconf", "numpy"}


class TrainingState:
    """An object of a checkpoint's training state, kept inert: takes any arguments and state, runs nothing."""

    dump_patches = False   # torch.load reads it when a legacy-format file's saved source differs from ours

    def __init__(self, *args: object, **kwargs: object) -> None:
        pass

    def __setstate__(self, state: object) -> None:
        pass

    def __setitem__(self, key: object, value: object) -> None:   # a dict-like object's items
        pass

    def append(self, item: object) -> None:                       # a list-like object's items
        pass

    def extend(self, items: object) -> None:
        pass


@functools.cache
def stand_in(module: str, name: str) -> type:
    """A TrainingState subclass named like the global `module.name` (one class per global)."""
    return type(name, (TrainingState,), {"__module__": module})


class LightningUnpickler(pickle.Unpickler):
    """Unpickles a Lightning checkpoint: tensors and plain data as themselves, the globals of
    TRAINING_STATE_PACKAGES as stand-ins, every other global refused (ForbiddenGlobal)."""

    def find_class(self, module: str, name: str):
        if (module, name) in PICKLED_DATA:
            return PICKLED_DATA[module, name]
        if module.partition(".")[0] in TRAINING_STATE_PACKAGES or (module, name) == ("typing", "Any"):
            return stand_in(module, name)
        raise ForbiddenGlobal(f"{module}.{name}")


LIGHTNING_PICKLE = types.SimpleNamespace(   # the `pickle_module` torch.load reads a Lightning checkpoint with
    __name__="totobench.model.vqgan.lightning_pickle", Unpickler=LightningUnpickler,
    load=lambda file, **kwargs: LightningUnpickler(file, **kwargs).load())


def read_lightning_pickle(path: Path, src: Path) -> object:
    """The object of a torch file that holds more than tensors (a Lightning checkpoint), read by
    LightningUnpickler after one notice line on stderr (which offers to convert `src`, the path
    the user gave). Raises CheckpointError naming a forbidden global, or for a file that does not
    unpickle."""
    print(PICKLE_NOTICE.format(path=path, src=src, out=src.with_suffix(".safetensors")), file=sys.stderr)
    try:
        with warnings.catch_warnings():   # torch may warn that a legacy file's saved source differs
            warnings.simplefilter("ignore")
            return torch.load(path, map_location="cpu", weights_only=False, pickle_module=LIGHTNING_PICKLE)
    except ForbiddenGlobal as err:
        raise CheckpointError(f"{path}: refusing to unpickle the global {err} (not part of a taming VQGAN "
                              f"checkpoint)") from None
    except Exception as err:  # a damaged file fails anywhere in zip, pickle or torch
        raise CheckpointError(f"{path}: not a readable torch file ({first_line(err)})") from None


def read_ckpt(path: Path, src: Path) -> dict:
    """The state dict of a torch file: a Lightning checkpoint's "state_dict", or the file's dict
    itself. Read with weights_only=True, else with read_lightning_pickle. Raises CheckpointError
    naming the file."""
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:   # it holds globals beyond tensors: Lightning's training state
        obj = read_lightning_pickle(path, src)
    except Exception as err:  # a damaged file fails anywhere in zip, pickle or torch
        raise CheckpointError(f"{path}: not a readable torch file ({first_line(err)})") from None
    state = obj.get("state_dict", obj) if isinstance(obj, dict) else obj
    if not isinstance(state, dict):
        raise CheckpointError(f"{path}: not a taming VQGAN checkpoint (it holds a {type(state).__name__}, "
                              f"expected a Lightning checkpoint with a state_dict)")
    return state


def read_weights(path: Path, src: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """The encoder's tensors of a .ckpt or .safetensors file (the keys under ENCODER_PREFIXES, as
    fp32) and the file's safetensors metadata ({} for a .ckpt). Raises CheckpointError naming
    the file when it is unreadable or holds a non-tensor under those keys."""
    if path.suffix == ".safetensors":
        try:
            with safe_open(path, "pt") as f:
                metadata = f.metadata() or {}
                state = {k: f.get_tensor(k) for k in f.keys() if k.startswith(ENCODER_PREFIXES)}
        except (SafetensorError, OSError) as err:
            raise CheckpointError(f"{path}: not a readable safetensors file ({first_line(err)})") from None
    else:
        state, metadata = read_ckpt(path, src), {}
    tensors = {}
    for key, value in state.items():
        if isinstance(key, str) and key.startswith(ENCODER_PREFIXES):
            if not isinstance(value, torch.Tensor):
                raise CheckpointError(f"{path}: {key} is a {type(value).__name__}, not a tensor")
            tensors[key] = value.detach().float()
    return tensors, metadata


def model_params(path: Path) -> dict | None:
    """model.params of a taming config file, None when the YAML has none (e.g. a Lightning trainer
    config). Raises CheckpointError naming the file when it is not valid YAML."""
    try:
        data = yaml.safe_load(path.read_text())
    except (yaml.YAMLError, UnicodeDecodeError) as err:
        raise CheckpointError(f"{path}: not valid YAML ({first_line(err)})") from None
    model = data.get("model") if isinstance(data, dict) else None
    params = model.get("params") if isinstance(model, dict) else None
    return params if isinstance(params, dict) else None


def checkpoint_files(path: Path) -> tuple[Path, tuple[Path, dict] | None]:
    """(weights file, (config file, its model.params) or None) for the path `rest` names: a
    .ckpt or .safetensors file (no config), or a folder laid out like the released models,
    `checkpoints/last.ckpt` and `configs/model.yaml` (the files may also sit in the folder
    itself). Among several .ckpt the folder's last.ckpt is taken; the config is the one .yaml
    holding model.params, None if no .yaml does. Raises CheckpointError naming the path when it
    is missing, a folder has no .ckpt or several candidates, or a .yaml is not valid YAML."""
    if path.is_file():
        return path, None
    if not path.is_dir():
        raise CheckpointError(f"{path}: not found (expected a taming VQGAN: a folder holding "
                              f"checkpoints/last.ckpt and configs/model.yaml, a .ckpt or a .safetensors)")
    ckpts = sorted(path.glob("*.ckpt")) + sorted(path.glob("checkpoints/*.ckpt"))
    if not ckpts:
        raise CheckpointError(f"{path}: no .ckpt in the folder nor in its checkpoints/ (expected the layout "
                              f"of the released taming models: checkpoints/last.ckpt, configs/model.yaml)")
    last = [p for p in ckpts if p.name == "last.ckpt"]
    if len(ckpts) > 1 and len(last) != 1:
        raise CheckpointError(f"{path}: several checkpoints ({', '.join(p.name for p in ckpts)}); "
                              f"give the one to read as vqgan:FILE")
    configs = [(p, params) for p in sorted(path.glob("*.yaml")) + sorted(path.glob("configs/*.yaml"))
               if (params := model_params(p)) is not None]
    if len(configs) > 1:
        names = ", ".join(str(p.relative_to(path)) for p, _ in configs)
        raise CheckpointError(f"{path}: several model configs ({names}); keep one")
    return (last or ckpts)[0], (configs[0] if configs else None)


# ---------------------------------------------------------------------- loading and converting
def load_vqgan_tokenizer(rest: str, *, device: str = "cpu") -> VQGANTokenizer:
    """Tokenizer family "vqgan": `rest` is the path (`~` expanded) of a taming VQGAN: a folder laid
    out like the released models (checkpoints/last.ckpt + configs/model.yaml), a Lightning .ckpt
    (hyper-parameters from the weights' shapes) or a .safetensors (ours, hyper-parameters in its
    metadata, or taming names). A .ckpt holding more than tensors is read by a restricted
    unpickler after a notice on stderr. Returns the tokenizer in eval mode without gradients on
    `device`. Raises CheckpointError with one line naming the file: missing or unreadable file,
    not a VQGAN, a weight of the wrong shape, weights that do not match the config, a forbidden
    pickle global."""
    src = Path(rest).expanduser()
    weights_path, config_file = checkpoint_files(src)
    tensors, metadata = read_weights(weights_path, src)
    weight_shape(tensors, "encoder.conv_in.weight", 4, weights_path)   # not a VQGAN: say so before anything else
    if config_file:
        config, source = config_from_yaml(config_file[1], config_file[0]), str(config_file[0])
    elif METADATA_KEY in metadata:
        config = config_from_metadata(metadata[METADATA_KEY], weights_path)
        source = f"its {METADATA_KEY!r} metadata"
    else:
        config, source = infer_config(tensors, weights_path), ""
    with torch.device("meta"):   # no random init: it is slow and would draw from the caller's generator
        model = VQGANTokenizer(config, name=f"vqgan:{rest}")
    check_weights(tensors, {k: v.shape for k, v in model.state_dict().items()}, weights_path, source)
    model.load_state_dict({k: tensors[k].contiguous() for k in model.state_dict()}, assign=True)
    model.sha256 = sha256_bytes(weights_bytes(model.state_dict()))
    return model.to(device).eval().requires_grad_(False)


def convert_vqgan(src, out) -> Path:
    """Read a taming VQGAN (any form `load_vqgan_tokenizer` reads) and write `out` as safetensors:
    the encoder's weights (taming names, fp32) and the hyper-parameters as metadata, so the file
    loads alone; written atomically. Returns `out` as a Path. Raises CheckpointError as
    load_vqgan_tokenizer does."""
    model = load_vqgan_tokenizer(str(src))
    tensors = {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in model.state_dict().items()}
    metadata = {"format": "pt", METADATA_KEY: json.dumps(asdict(model.config))}
    return atomic_write(Path(out).expanduser(), save_safetensors_bytes(tensors, metadata=metadata))
