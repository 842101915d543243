"""`totobench convert dvae FILE [--out OUT]`: a model file as safetensors, which loads without pickles."""

from __future__ import annotations

from pathlib import Path

from totobench.errors import ConfigError
from totobench.model.dvae import convert_dvae, load_dvae_tokenizer


def cli_convert(args) -> int:
    """Convert `args.file` (a `args.what` file: "dvae") to safetensors at `args.out` (None: FILE
    with the suffix .safetensors), then read it back and print one line: the output path, the
    number of codes and the sha256 of the weights. Raises ConfigError for another kind,
    CheckpointError for a file that is not what `args.what` says."""
    if args.what != "dvae":
        raise ConfigError(f"totobench convert: unknown kind {args.what!r}; expected dvae")
    out = Path(args.out) if args.out else Path(args.file).with_suffix(".safetensors")
    converted = load_dvae_tokenizer(str(convert_dvae(args.file, out)))
    print(f"{out}: DALL-E dVAE encoder, {converted.codebook_size} codes, sha256 {converted.sha256}")
    return 0
