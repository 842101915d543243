"""Token sequences as Toto sees them (Rajasegaran et al. 2025, section 3).

A video clip is `num_frames` frames taken every `frame_stride`-th frame; images are packed
`images_per_sequence` to a sequence. Each frame is tokenized on its own and its ids are laid out in
raster order, frame after frame, between a start token of the sequence's kind and an end token:

    [video_start_id | image_start_id] f0[0] .. f0[h*w-1] f1[0] .. f(N-1)[h*w-1] [end_id]

The special ids come from the model config: image_start_id = codebook_size,
video_start_id = codebook_size + 1, end_id = codebook_size + 2.
"""

from __future__ import annotations

import torch

KINDS = ("image", "video")


def start_id(config, kind: str) -> int:
    """The start token id of a sequence of `kind` ("image" or "video")."""
    if kind == "image":
        return config.image_start_id
    if kind == "video":
        return config.video_start_id
    raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")


def clip_span(num_frames: int, frame_stride: int) -> int:
    """Frames of the source video a clip covers: (num_frames - 1) * frame_stride + 1."""
    return (num_frames - 1) * frame_stride + 1


def clip_frame_indices(start: int, num_frames: int, frame_stride: int) -> list[int]:
    """Indices into the source video of a clip starting at frame `start`:
    [start, start + stride, ..., start + (num_frames - 1) * stride]."""
    return [start + i * frame_stride for i in range(num_frames)]


def num_clip_starts(video_length: int, num_frames: int, frame_stride: int) -> int:
    """How many clip start frames fit in a video of `video_length` frames (0 if the video is too short)."""
    return max(0, video_length - clip_span(num_frames, frame_stride) + 1)


def build_sequence(frame_tokens: torch.Tensor, kind: str, config, add_end: bool = True) -> torch.Tensor:
    """frame_tokens LongTensor [T, h, w] or [T, h*w] (one row per frame or image, codebook ids)
    -> LongTensor [1 + T*h*w (+ 1 with add_end)]: start token of `kind`, the ids in raster order
    frame after frame, then the end token."""
    ids = frame_tokens.reshape(frame_tokens.shape[0], -1).reshape(-1).long()
    if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= config.codebook_size):
        raise ValueError(f"frame token ids must be in [0, {config.codebook_size})")
    parts = [torch.tensor([start_id(config, kind)]), ids]
    if add_end:
        parts.append(torch.tensor([config.end_id]))
    return torch.cat(parts)


def build_batch(frame_tokens: torch.Tensor, kind: str, config) -> torch.Tensor:
    """frame_tokens [B, T, h*w] (or [B, T, h, w]) -> LongTensor [B, 1 + T*h*w]: a start token of
    `kind` prepended to every row, no end token. The layout the feature extractor feeds the model;
    position 1 + t*h*w + j holds token j of frame t."""
    b = frame_tokens.shape[0]
    ids = frame_tokens.reshape(b, -1).long()
    start = torch.full((b, 1), start_id(config, kind), dtype=torch.long)
    return torch.cat([start, ids], dim=1)


def split_sequence(sequence: torch.Tensor, config) -> tuple[str, torch.Tensor]:
    """Inverse of build_sequence: LongTensor [1 + T*tokens_per_frame (+ 1 end token)]
    -> (kind, frame_tokens LongTensor [T, tokens_per_frame])."""
    first = int(sequence[0])
    kinds = {config.image_start_id: "image", config.video_start_id: "video"}
    if first not in kinds:
        raise ValueError(f"sequence does not begin with a start token (got id {first})")
    body = sequence[1:-1] if int(sequence[-1]) == config.end_id else sequence[1:]
    if body.numel() % config.tokens_per_frame:
        raise ValueError(f"{body.numel()} frame tokens is not a multiple of {config.tokens_per_frame} per frame")
    return kinds[first], body.view(-1, config.tokens_per_frame)
