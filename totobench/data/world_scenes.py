"""The scenes of the embedded data world, one sampler per dataset kind.

Each sampler turns a numpy Generator into pixels (and labels): an object image (ImageNet-like), an
action clip whose class is only visible in the motion (Kinetics-like), a multi-object sequence with
instance masks (DAVIS-like), and a hand reaching for objects on a table (Ego4D STA-like).
`part` ("train" or "eval") picks the pool of handwritten digit scans (see `digit_pool`).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from PIL import Image

from totobench.data.world_content import (DIGITS, SHAPES, Pose, Sprite, hand_alpha, paste, skin_colour,
                                          sprite_alpha, texture, to_image, to_uint8)

# ----------------------------------------------------------------------------- object images

OBJECT_CLASSES = DIGITS + SHAPES  # the ImageNet-like classes, in wnid order
_DIGIT_NAMES = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
OBJECT_CLASS_NAMES = tuple(f"{n}, digit {n}" for n in _DIGIT_NAMES) + SHAPES
# Shaped like WordNet ids (n + 8 digits), increasing, so sorted wnids follow OBJECT_CLASSES.
OBJECT_WNIDS = tuple(f"n{3100000 + 1371 * i:08d}" for i in range(len(OBJECT_CLASSES)))
# Hue of each class's objects in ImageNet-like images, spread so that neighbouring classes differ.
OBJECT_CLASS_HUES = tuple(((5 * i) % len(OBJECT_CLASSES)) / len(OBJECT_CLASSES) for i in range(len(OBJECT_CLASSES)))


def object_image(rng: np.random.Generator, kind: str, h: int, w: int, part: str,
                 class_hue: float | None = None) -> np.ndarray:
    """uint8 [h, w, 3]: one object of class `kind` at a random place, scale, colour and tilt over a
    textured background, with a little clutter. The object stays inside the central square.

    With `class_hue` the image is "photographed": the object is framed near the centre and coloured
    near its class's hue, the kind of placement and colour bias of real photo datasets.
    """
    background = texture(rng, h, w, grain=0.02)
    avoid, image = background.mean(axis=(0, 1)), to_image(background)
    for _ in range(int(rng.integers(0, 3))):  # clutter: small dots and bars, far smaller than objects
        clutter = Sprite.coloured(sprite_alpha(str(rng.choice(["circle", "square"])), rng, part), rng)
        paste(image, clutter, Pose(rng.uniform(0, w), rng.uniform(0, h), rng.uniform(5, 10),
                                   rng.uniform(0, 360), rng.uniform(0.3, 1.0)))
    m = min(h, w)
    size = rng.uniform(0.45, 0.8) * m
    margin = 0.38 * size
    x_range = ((w - m) / 2 + margin, (w + m) / 2 - margin)
    y_range = ((h - m) / 2 + margin, (h + m) / 2 - margin)
    if class_hue is None:
        cx, cy = rng.uniform(*x_range), rng.uniform(*y_range)
    else:
        cx = float(np.clip(w / 2 + rng.normal(0, 0.08 * m), *x_range))
        cy = float(np.clip(h / 2 + rng.normal(0, 0.08 * m), *y_range))
    angle = rng.uniform(-20, 20) if kind in DIGITS else rng.uniform(0, 360)
    paste(image, Sprite.coloured(sprite_alpha(kind, rng, part), rng, avoid, hue=class_hue),
          Pose(cx, cy, size, angle, rng.uniform(0.85, 1.18)))
    return np.asarray(image)


def scene_image(rng: np.random.Generator, h: int, w: int, part: str) -> np.ndarray:
    """uint8 [h, w, 3]: a pre-training image, either one object or a few overlapping ones."""
    if rng.random() < 0.6:
        return object_image(rng, str(rng.choice(OBJECT_CLASSES)), h, w, part)
    background = texture(rng, h, w, grain=0.02)
    avoid, image = background.mean(axis=(0, 1)), to_image(background)
    for _ in range(int(rng.integers(2, 5))):
        kind = str(rng.choice(OBJECT_CLASSES))
        paste(image, Sprite.coloured(sprite_alpha(kind, rng, part), rng, avoid),
              Pose(rng.uniform(0, w), rng.uniform(0, h), rng.uniform(0.25, 0.6) * min(h, w), rng.uniform(0, 360)))
    return np.asarray(image)


# ----------------------------------------------------------------------------- action clips

ACTIONS = ("moving left", "moving right", "moving up", "moving down", "rotating clockwise",
           "rotating counterclockwise", "growing", "shrinking", "bouncing", "shaking side to side")
# Sprites whose rotation is visible (the gradient fill breaks the symmetry of the shapes too).
_ACTION_SPRITES = DIGITS + ("triangle", "square", "star", "cross")


def action_clip(rng: np.random.Generator, action: str, h: int, w: int, num_frames: int, part: str) -> np.ndarray:
    """uint8 [num_frames, h, w, 3]: a sprite performing `action` over a static textured background.

    The sprite's centre, size and angle at the middle frame are drawn from one distribution for
    every action, so the middle frame alone carries no information about the class.
    """
    t = np.arange(num_frames, dtype=np.float64) - (num_frames - 1) / 2
    m = min(h, w)
    travel = rng.uniform(0.3, 0.5) * m  # total displacement of the translating actions
    cx = np.full(num_frames, rng.uniform(0.25 * m, w - 0.25 * m))
    cy = np.full(num_frames, rng.uniform(0.25 * m, h - 0.25 * m))
    size = np.full(num_frames, rng.uniform(0.28, 0.4) * m)
    angle = np.full(num_frames, rng.uniform(0, 360))
    speed = travel / max(num_frames - 1, 1)
    if action == "moving left":
        cx -= speed * t
    elif action == "moving right":
        cx += speed * t
    elif action == "moving up":
        cy -= speed * t
    elif action == "moving down":
        cy += speed * t
    elif action in ("rotating clockwise", "rotating counterclockwise"):
        angle += (1 if action == "rotating clockwise" else -1) * rng.uniform(4, 8) * t
    elif action in ("growing", "shrinking"):
        size *= rng.uniform(1.6, 2.2) ** ((1 if action == "growing" else -1) * t / max(num_frames - 1, 1))
    elif action == "bouncing":
        height, period = rng.uniform(0.15, 0.25) * m, rng.uniform(9, 14)
        cy += height / 2 - height * np.abs(np.sin(np.pi * t / period + rng.uniform(0, np.pi)))
    elif action == "shaking side to side":
        cx += rng.uniform(4, 7) * np.sin(2 * np.pi * t / rng.uniform(6, 10) + rng.uniform(0, 2 * np.pi))
    else:
        raise ValueError(f"unknown action {action!r}")
    background = texture(rng, h, w)
    avoid, background = background.mean(axis=(0, 1)), to_image(background)
    if rng.random() < 0.5:  # a still distractor: the moving sprite is not the only object
        other = Sprite.coloured(sprite_alpha(str(rng.choice(_ACTION_SPRITES)), rng, part), rng, avoid)
        paste(background, other, Pose(rng.uniform(0, w), rng.uniform(0, h), rng.uniform(0.2, 0.32) * m,
                                      rng.uniform(0, 360)))
    sprite = Sprite.coloured(sprite_alpha(str(rng.choice(_ACTION_SPRITES)), rng, part), rng, avoid)
    frames = np.empty((num_frames, h, w, 3), np.uint8)
    for i in range(num_frames):
        canvas = background.copy()
        paste(canvas, sprite, Pose(cx[i], cy[i], size[i], angle[i]))
        frames[i] = np.asarray(canvas)
    return frames


# ----------------------------------------------------------------------------- multi-object sequences

def object_sequence(rng: np.random.Generator, h: int, w: int, num_frames: int, part: str,
                    max_objects: int = 4, quick_return: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """A DAVIS-like sequence: frames uint8 [T, h, w, 3] and instance masks uint8 [T, h, w].

    2..max_objects sprites (ids 1..K, all visible in frame 0) drift, turn and bounce while the camera
    pans; they occlude each other, and the first one usually leaves the frame and comes back.
    `quick_return` makes the leaving object head out faster from nearer the edge, so that it is back
    within ~20 frames (DAVIS sequences); otherwise it may stay out until the end.
    """
    pad = 16
    backdrop = texture(rng, h + 2 * pad, w + 2 * pad)
    avoid, backdrop = backdrop.mean(axis=(0, 1)), to_image(backdrop)
    pan = rng.uniform(-0.7, 0.7, 2)
    k = int(rng.integers(2, max_objects + 1))
    for _ in range(50):  # until every object shows in frame 0 (DAVIS counts objects there)
        objects = [_moving_object(rng, h, w, num_frames, part, leaves=(i == 0 and rng.random() < 0.8),
                                  avoid=avoid, quick_return=quick_return) for i in range(k)]
        _, ids = _draw(backdrop.crop((pad, pad, pad + w, pad + h)), objects, 0)
        if all((ids == i + 1).sum() >= 30 for i in range(k)):
            break
    frames = np.empty((num_frames, h, w, 3), np.uint8)
    masks = np.empty((num_frames, h, w), np.uint8)
    for t in range(num_frames):
        ox, oy = np.clip(np.round(pad + pan * t), 0, 2 * pad).astype(int)
        image, ids = _draw(backdrop.crop((ox, oy, ox + w, oy + h)), objects, t)
        frames[t], masks[t] = np.asarray(image), ids
    return frames, masks


@dataclass
class _MovingObject:
    sprite: Sprite
    poses: list[Pose]
    depth: float  # drawing order: larger is nearer the camera


def _moving_object(rng, h, w, num_frames, part, leaves, avoid, quick_return) -> _MovingObject:
    size = rng.uniform(0.3, 0.5) * h
    kind = str(rng.choice(DIGITS + SHAPES))
    sprite = Sprite.coloured(sprite_alpha(kind, rng, part), rng, avoid)
    if leaves:  # start near an edge, head out fast; walls beyond the frame send it back in
        along_x = rng.random() < 0.6
        extent = w if along_x else h
        near, far, slow, fast, beyond = (0.5, 0.8, 4.0, 6.0, 0.7) if quick_return else (0.55, 1.1, 3.0, 5.0, 0.9)
        pos = extent - rng.uniform(near, far) * size
        speed = rng.uniform(slow, fast)
        lo, hi = 0.45 * size, extent + beyond * size
        other = rng.uniform(0.45 * size, (h if along_x else w) - 0.45 * size)
        x, y = (pos, other) if along_x else (other, pos)
        vx, vy = (speed, rng.uniform(-0.5, 0.5)) if along_x else (rng.uniform(-0.5, 0.5), speed)
        if rng.random() < 0.5:  # mirror: leave through the left/top edge instead
            x, vx = (w - x, -vx) if along_x else (x, vx)
            y, vy = (y, vy) if along_x else (h - y, -vy)
            lo, hi = -beyond * size, extent - 0.45 * size
        walls_x = (lo, hi) if along_x else (0.45 * size, w - 0.45 * size)
        walls_y = (0.45 * size, h - 0.45 * size) if along_x else (lo, hi)
    else:
        x, y = rng.uniform(0.45 * size, w - 0.45 * size), rng.uniform(0.45 * size, h - 0.45 * size)
        a = rng.uniform(0, 2 * np.pi)
        vx, vy = rng.uniform(0.5, 2.5) * np.cos(a), rng.uniform(0.5, 2.5) * np.sin(a)
        walls_x, walls_y = (0.45 * size, w - 0.45 * size), (0.45 * size, h - 0.45 * size)
    angle, spin = rng.uniform(-30, 30), rng.uniform(-3, 3)
    breathe, phase = rng.uniform(0, 0.15), rng.uniform(0, 2 * np.pi)
    poses = []
    for t in range(num_frames):
        poses.append(Pose(x, y, size * (1 + breathe * np.sin(0.3 * t + phase)), angle + spin * t))
        x, vx = _bounce(x + vx, vx, *walls_x)
        y, vy = _bounce(y + vy, vy, *walls_y)
    return _MovingObject(sprite, poses, rng.random())


def _bounce(p, v, lo, hi):
    if p < lo:
        return 2 * lo - p, abs(v)
    if p > hi:
        return 2 * hi - p, -abs(v)
    return p, v


def _draw(image, objects, t):
    """Paste the objects at frame t onto `image` (modified) back to front -> (image, ids [H, W])."""
    ids = np.zeros((image.height, image.width), np.uint8)
    for i in sorted(range(len(objects)), key=lambda i: objects[i].depth):
        paste(image, objects[i].sprite, objects[i].poses[t], ids, i + 1)
    return image, ids


# ----------------------------------------------------------------------------- hand-object interactions

NOUNS = ("circle", "square", "triangle", "star", "cross", "ring", "digit three", "digit eight")
_NOUN_SPRITES = ("circle", "square", "triangle", "star", "cross", "ring", "3", "8")
# Each verb has its own hand shape (see hand_alpha), so the interaction is visible while reaching.
VERBS = ("take", "touch", "push", "pinch")
_VERB_HANDS = ("open", "point", "fist", "pinch")


@dataclass
class Interaction:
    contact_frame: int  # first frame where the hand touches the object
    object_index: int  # index into the video's objects
    verb_id: int
    start_frame: int  # first frame of the approach (the hand enters the frame)


@dataclass
class TableVideo:
    frames: np.ndarray  # uint8 [T, h, w, 3]
    noun_ids: list[int]  # per object on the table
    boxes: list[list[float]]  # per object: [x1, y1, x2, y2] in pixels (objects do not move)
    interactions: list[Interaction]


def table_video(rng: np.random.Generator, h: int, w: int, num_interactions: int, part: str) -> TableVideo:
    """A hand that, one interaction after another, enters from the bottom edge, reaches for one of
    the objects on a textured table in a straight line at constant speed, touches it, holds, and
    withdraws. Noun = the touched object's class, verb = the hand shape."""
    table = texture(rng, h, w)
    avoid, table = table.mean(axis=(0, 1)), to_image(table)
    noun_ids, boxes, centres, sizes = [], [], [], []
    for _ in range(int(rng.integers(3, 6))):
        size = rng.uniform(0.24, 0.32) * h
        for _ in range(100):  # non-overlapping places in the upper part (the hand comes from below)
            c = np.array([rng.uniform(0.4 * size, w - 0.4 * size), rng.uniform(0.4 * size, 0.72 * h)])
            if all(np.linalg.norm(c - o) > 0.5 * (size + s) for o, s in zip(centres, sizes)):
                break
        else:
            continue
        noun = int(rng.integers(len(NOUNS)))
        ids = np.zeros((h, w), np.uint8)
        paste(table, Sprite.coloured(sprite_alpha(_NOUN_SPRITES[noun], rng, part), rng, avoid),
              Pose(c[0], c[1], size, rng.uniform(-15, 15)), ids, 1)
        ys, xs = np.nonzero(ids)
        noun_ids.append(noun)
        boxes.append([float(xs.min()), float(ys.min()), float(xs.max() + 1), float(ys.max() + 1)])
        centres.append(c)
        sizes.append(size)

    skin = tuple(int(c) for c in to_uint8(skin_colour(rng)))
    scale = rng.uniform(0.13, 0.17) * h
    # The hand keeps its shape and heading during an interaction, so it is drawn once per interaction
    # on a canvas three times the frame, tip at the centre, and shifted to each frame's tip position.
    hands: list[np.ndarray] = []
    tips: list[tuple[int, np.ndarray] | None] = [None] * int(rng.integers(3, 8))  # per frame
    interactions, previous = [], -1
    for _ in range(num_interactions):
        target = int(rng.choice([i for i in range(len(centres)) if i != previous] or [0]))
        verb = int(rng.integers(len(VERBS)))
        entry = np.array([rng.uniform(0.2 * w, 0.8 * w), h + 2.5 * scale])
        direction = centres[target] - entry
        touch = centres[target] - direction / np.linalg.norm(direction) * 0.25 * sizes[target]
        hands.append(to_uint8(hand_alpha(3 * h, 3 * w, (1.5 * w, 1.5 * h), direction, _VERB_HANDS[verb], scale)))
        approach, hold, withdraw = int(rng.integers(14, 23)), 4, 6
        start = len(tips)
        tips += [(len(hands) - 1, entry + (touch - entry) * i / approach) for i in range(approach)]
        tips += [(len(hands) - 1, touch)] * hold
        tips += [(len(hands) - 1, touch + (entry - touch) * i / withdraw) for i in range(1, withdraw + 1)]
        tips += [None] * int(rng.integers(2, 6))
        interactions.append(Interaction(start + approach, target, verb, start))
        previous = target

    frames = np.empty((len(tips), h, w, 3), np.uint8)
    for t, tip in enumerate(tips):
        image = table.copy()
        if tip is not None:
            x0, y0 = int(round(1.5 * w - tip[1][0])), int(round(1.5 * h - tip[1][1]))
            mask = Image.fromarray(hands[tip[0]][y0:y0 + h, x0:x0 + w], "L")
            image.paste(skin, (0, 0, w, h), mask)
        frames[t] = np.asarray(image)
    return TableVideo(frames, noun_ids, boxes, interactions)


# ----------------------------------------------------------------------------- pre-training videos

def scene_clip(rng: np.random.Generator, h: int, w: int, num_frames: int, part: str) -> np.ndarray:
    """uint8 [num_frames, h, w, 3]: a pre-training video, an action clip, a multi-object sequence
    or a hand reaching for objects."""
    kind = rng.random()
    if kind < 0.45:
        return action_clip(rng, str(rng.choice(ACTIONS)), h, w, num_frames, part)
    if kind < 0.75:
        return object_sequence(rng, h, w, num_frames, part)[0]
    frames = table_video(rng, h, w, 2, part).frames
    return frames[:num_frames] if len(frames) >= num_frames else np.concatenate(
        [frames, np.repeat(frames[-1:], num_frames - len(frames), axis=0)])

