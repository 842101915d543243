"""MetaWorld scenes rendered offscreen, and expert demonstrations stored once on disk.

    env = RobotEnv("drawer-open", resolution=64)       # one simulator + one renderer, reused
    frame, proprio, obs = env.reset(seed=3)            # uint8 [R, R, 3], float32 [4], state
    frame, proprio, obs, success = env.step(action)    # `action_repeat` physics steps per call
    demos = load_or_record_demos(root, "drawer-open", num_demos=25, resolution=64)

Every episode's initial state (object and goal positions) is drawn from the environment's own
random generator seeded with the episode's seed, so a seed names one exact scene. Frames come
from a fixed camera ("corner3": the whole table and the arm) whose MetaWorld definition is rolled
by 180 degrees; frames are turned upright before anyone sees them. Shadows, reflections, the skybox
and multi-sampling are switched off: at 64 px they add nothing and cost 10x the CPU.

Demonstrations are MetaWorld's scripted expert policies (which read the full simulator state,
goal included). Each episode is kept until a few decisions after the first success; failed
expert episodes are replaced by the next seed. One `.npz` per environment and setting:
frames uint8 [E, S, R, R, 3], actions float32 [E, S, 4], proprio float32 [E, S, 4]
(hand xyz, gripper opening), length int [E] (valid steps; the rest is zero padding),
success bool [E], success_step int [E] (first successful decision), seeds int [E].
"""

from __future__ import annotations

import difflib
import hashlib
import json
import os
import warnings
from pathlib import Path

import numpy as np

from totobench.errors import ConfigError, DataError
from totobench.io import atomic_path
from totobench.paths import data_home

CAMERA = "corner3"
ACTION_REPEAT = 3             # physics steps per policy decision (expert still succeeds: ~20-30 decisions)
EPISODE_LENGTH = 40           # policy decisions per episode
STEPS_AFTER_SUCCESS = 5       # demo decisions kept after the first success (holding the goal)
PROPRIO_DIM = 4               # hand xyz + gripper opening
ACTION_DIM = 4
ROLLOUT_SEED_OFFSET = 5000    # rollout seeds never overlap demo seeds
DEMO_FORMAT = 1               # bump when rendering or recording changes (invalidates the cache)


def setup_offscreen_gl() -> None:
    """Pick a display-less OpenGL backend before mujoco is imported (osmesa unless set)."""
    os.environ.setdefault("MUJOCO_GL", "osmesa")
    os.environ.setdefault("PYOPENGL_PLATFORM", os.environ["MUJOCO_GL"])


def preload_triton() -> None:
    """Import triton (if installed) before mujoco: triton bundles its own LLVM, and importing it
    after OSMesa's llvmpipe is loaded segfaults. torch imports triton lazily (the first optimizer,
    torch.compile), so without this a BC fit after a rollout would crash the process."""
    try:
        import triton  # noqa: F401
    except Exception:  # noqa: BLE001 (absent or broken: torch then never loads it either)
        pass


setup_offscreen_gl()   # mujoco picks its GL backend when first imported
preload_triton()


def _metaworld():
    setup_offscreen_gl()
    preload_triton()
    try:
        import metaworld  # noqa: F401
        import mujoco  # noqa: F401
        from metaworld.env_dict import ALL_V3_ENVIRONMENTS
        from metaworld.policies import ENV_POLICY_MAP
    except ImportError as err:
        raise ConfigError(f"the robot task needs mujoco and metaworld ({err}); "
                          f"install them with `pip install -e .[robot]`") from None
    return ALL_V3_ENVIRONMENTS, ENV_POLICY_MAP


def metaworld_name(name: str) -> str:
    """'drawer-open' or 'drawer-open-v3' -> 'drawer-open-v3'; ConfigError with close matches."""
    envs, policies = _metaworld()
    full = name if name.endswith("-v3") else f"{name}-v3"
    if full not in envs or full not in policies:
        known = [n.removesuffix("-v3") for n in envs if n in policies]
        close = difflib.get_close_matches(name.removesuffix("-v3"), known, n=3)
        hint = f"; did you mean {', '.join(close)}?" if close else ""
        raise ConfigError(f"unknown MetaWorld task {name!r}{hint} (e.g. drawer-open, pick-place)")
    return full


def short_name(name: str) -> str:
    return name.removesuffix("-v3")


def rollout_seed(seed: int, index: int) -> int:
    return seed * 10_000 + ROLLOUT_SEED_OFFSET + index


def demo_seed(seed: int, index: int) -> int:
    return seed * 10_000 + index


class RobotEnv:
    """One MetaWorld task with its own offscreen renderer; reset with a seed, step with actions.

    Keep the object alive while rendering and call close() at the end (a renderer freed by the
    garbage collector mid-run can disturb the GL state of the others)."""

    def __init__(self, name: str, resolution: int, camera: str = CAMERA,
                 action_repeat: int = ACTION_REPEAT):
        envs, policies = _metaworld()   # sets up offscreen GL first
        import mujoco
        self.name = metaworld_name(name)
        self.resolution = resolution
        self.camera = camera
        self.action_repeat = action_repeat
        env = envs[self.name]()
        # the goal-observable set-up: the expert reads the goal, the learned policy never does
        env._partially_observable = False
        del env.sawyer_observation_space           # cached with the goal hidden; recompute
        env._set_task_called = True
        env._freeze_rand_vec = False               # a new scene at every reset ...
        env.seeded_rand_vec = True                 # ... drawn from env.np_random (seeded per episode)
        self.env = env
        self.expert = policies[self.name]()
        cams = [env.model.camera(i).name for i in range(env.model.ncam)]
        if camera not in cams:
            raise ConfigError(f"camera {camera!r} is not in MetaWorld's scene (cameras: {', '.join(cams)})")
        env.model.vis.quality.shadowsize = 0
        env.model.vis.quality.offsamples = 0
        self.renderer = mujoco.Renderer(env.model, resolution, resolution)
        flags = self.renderer.scene.flags
        flags[mujoco.mjtRndFlag.mjRND_REFLECTION] = 0
        flags[mujoco.mjtRndFlag.mjRND_SKYBOX] = 0
        self._obs = None

    def render(self) -> np.ndarray:
        """uint8 [R, R, 3], upright (MetaWorld's corner cameras are mounted upside down)."""
        self.renderer.update_scene(self.env.data, camera=self.camera)
        return np.ascontiguousarray(np.rot90(self.renderer.render(), 2))

    def proprio(self) -> np.ndarray:
        return self._obs[:PROPRIO_DIM].astype(np.float32)

    def reset(self, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """A new scene drawn from `seed` -> (frame, proprio, full state obs)."""
        self.env.seed(int(seed))
        self._obs, _ = self.env.reset()
        return self.render(), self.proprio(), self._obs

    def step(self, action: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, bool]:
        """Apply `action` (clipped to [-1, 1]) for `action_repeat` physics steps ->
        (frame, proprio, obs, success at any of those steps)."""
        action = np.clip(np.asarray(action, dtype=np.float32), -1.0, 1.0)
        success = False
        for _ in range(self.action_repeat):
            self._obs, _, _, _, info = self.env.step(action)
            success = success or bool(info["success"])
        return self.render(), self.proprio(), self._obs, success

    def expert_action(self) -> np.ndarray:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")    # "Constant(s) may be too high": the env clips anyway
            action = np.asarray(self.expert.get_action(self._obs), dtype=np.float32)
        return np.clip(action, -1.0, 1.0)      # what the simulator applies

    def close(self) -> None:
        self.renderer.close()
        self.env.close()


def record_demos(name: str, num_demos: int, resolution: int, seed: int = 0,
                 episode_length: int = EPISODE_LENGTH, action_repeat: int = ACTION_REPEAT,
                 camera: str = CAMERA, on_episode=None) -> dict[str, np.ndarray]:
    """Run the scripted expert on seeds demo_seed(seed, 0), (seed, 1), ... and keep the first
    `num_demos` successful episodes (arrays described in the module docstring).
    Raises DataError if the expert fails on too many seeds."""
    env = RobotEnv(name, resolution, camera, action_repeat)
    R = resolution
    S = episode_length
    frames = np.zeros((num_demos, S, R, R, 3), np.uint8)
    actions = np.zeros((num_demos, S, ACTION_DIM), np.float32)
    proprio = np.zeros((num_demos, S, PROPRIO_DIM), np.float32)
    length = np.zeros(num_demos, np.int64)
    success_step = np.full(num_demos, -1, np.int64)
    seeds = np.zeros(num_demos, np.int64)
    kept = attempts = 0
    try:
        while kept < num_demos:
            if attempts >= 2 * num_demos + 10:
                raise DataError(f"{name}: the MetaWorld expert succeeded in only {kept} of {attempts} "
                                f"episodes of {S} decisions (x{action_repeat} steps); raise episode_length")
            s = demo_seed(seed, attempts)
            attempts += 1
            frame, prop, _ = env.reset(s)
            first, t = -1, 0
            while t < S and (first < 0 or t <= first + STEPS_AFTER_SUCCESS):
                act = env.expert_action()
                frames[kept, t], proprio[kept, t], actions[kept, t] = frame, prop, act
                frame, prop, _, success = env.step(act)
                if success and first < 0:
                    first = t
                t += 1
            if first < 0:
                frames[kept] = 0
                continue
            length[kept], success_step[kept], seeds[kept] = t, first, s
            kept += 1
            if on_episode is not None:
                on_episode()
    finally:
        env.close()
    return {"frames": frames, "actions": actions, "proprio": proprio, "length": length,
            "success": success_step >= 0, "success_step": success_step, "seeds": seeds}


def demos_filename(name: str, num_demos: int, resolution: int, seed: int, episode_length: int,
                   action_repeat: int, camera: str) -> str:
    return (f"{short_name(metaworld_name(name))}_r{resolution}_{camera}_len{episode_length}"
            f"_rep{action_repeat}_seed{seed}_v{DEMO_FORMAT}_n{num_demos}.npz")


def demos_dir(root: Path | None = None) -> Path:
    return Path(root) if root is not None else data_home() / "robot"


def _read_npz(path: Path) -> dict[str, np.ndarray]:
    try:
        with np.load(path, allow_pickle=False) as z:
            data = {k: z[k] for k in z.files if k != "meta"}
    except (OSError, ValueError, EOFError) as err:
        raise DataError(f"{path}: unreadable demonstrations file ({err}); delete it to re-record") from None
    missing = {"frames", "actions", "proprio", "length", "success_step", "seeds"} - set(data)
    if missing:
        raise DataError(f"{path}: demonstrations file lacks {', '.join(sorted(missing))}; delete it to re-record")
    data.setdefault("success", data["success_step"] >= 0)
    return data


def load_or_record_demos(root: Path | None, name: str, num_demos: int, resolution: int, seed: int = 0,
                         episode_length: int = EPISODE_LENGTH, action_repeat: int = ACTION_REPEAT,
                         camera: str = CAMERA, on_episode=None) -> tuple[dict[str, np.ndarray], Path]:
    """The demonstrations of one task, from `root` (default data_home()/robot) or recorded once
    and written there atomically. A file with more demos of the same setting is reused (its first
    `num_demos` episodes are the same seeds). Returns (arrays, path of the file read or written)."""
    folder = demos_dir(root)
    fname = demos_filename(name, num_demos, resolution, seed, episode_length, action_repeat, camera)
    stem = fname.rsplit("_n", 1)[0]
    candidates = []
    if folder.is_dir():
        for p in folder.glob(stem + "_n*.npz"):
            try:
                n = int(p.stem.rsplit("_n", 1)[1])
            except ValueError:
                continue
            if n >= num_demos:
                candidates.append((n, p))
    if candidates:
        path = min(candidates)[1]
        data = _read_npz(path)
        return {k: v[:num_demos] for k, v in data.items()}, path
    data = record_demos(name, num_demos, resolution, seed, episode_length, action_repeat, camera, on_episode)
    path = folder / fname
    meta = {"env": metaworld_name(name), "camera": camera, "resolution": resolution, "seed": seed,
            "episode_length": episode_length, "action_repeat": action_repeat, "format": DEMO_FORMAT,
            "versions": _versions()}
    with atomic_path(path) as tmp, open(tmp, "wb") as f:  # a file object: savez adds no ".npz"
        np.savez_compressed(f, meta=np.array(json.dumps(meta)), **data)
    return data, path


def _versions() -> dict[str, str]:
    import metaworld
    import mujoco
    return {"mujoco": mujoco.__version__, "metaworld": getattr(metaworld, "__version__", "3.1.1")}


def demos_fingerprint(demos: dict[str, dict[str, np.ndarray]]) -> str:
    """sha256 over every task's frames, actions and proprioception (sorted by task)."""
    h = hashlib.sha256()
    for name in sorted(demos):
        h.update(name.encode())
        for key in ("frames", "actions", "proprio", "length"):
            h.update(np.ascontiguousarray(demos[name][key]).tobytes())
    return h.hexdigest()
