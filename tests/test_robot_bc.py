"""Behaviour-cloning policy, context stacking and the lockstep rollout loop (no simulator)."""

import numpy as np
import pytest
import torch

from totobench.probes.bc_policy import train_bc_policy
from totobench.tasks.base import RunContext
from totobench.tasks.robot import RobotBC, run_rollouts, stack_context


def synthetic(n=256, d=12, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, d)).astype(np.float32) * rng.uniform(0.1, 10, size=d).astype(np.float32)
    w = rng.normal(size=(d, 4)).astype(np.float32)
    y = np.tanh((x / x.std(0)) @ w / np.sqrt(d)).astype(np.float32)
    return x, y


def test_bc_fits_a_smooth_map_and_is_deterministic():
    x, y = synthetic()
    policy, info = train_bc_policy(x, y, hidden=(64, 64, 64), epochs=30, batch_size=64, seed=3)
    baseline = float(np.mean((y - y.mean(0)) ** 2))
    assert info["train_mse"] < 0.15 * baseline          # measured 0.08; a constant predictor scores 1.0
    assert info["steps"] == 30 * 4
    with torch.no_grad():
        pred = policy(torch.from_numpy(x)).numpy()        # unclipped, as trained
    np.testing.assert_allclose(np.mean((pred - y) ** 2), info["train_mse"], rtol=1e-4)
    again, _ = train_bc_policy(x, y, hidden=(64, 64, 64), epochs=30, batch_size=64, seed=3)
    for a, b in zip(policy.state_dict().values(), again.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    other, _ = train_bc_policy(x, y, hidden=(64, 64, 64), epochs=30, batch_size=64, seed=4)
    assert not torch.equal(other.net[0].weight, policy.net[0].weight)


def test_act_clips_to_action_range():
    x = np.zeros((4, 3), np.float32)
    y = np.full((4, 2), 5.0, np.float32)            # targets outside [-1, 1]
    policy, _ = train_bc_policy(x, y, hidden=(8,), epochs=200, batch_size=4, lr=1e-2)
    np.testing.assert_array_equal(policy.act(x), np.ones((4, 2), np.float32))


def test_bc_rejects_mismatched_inputs():
    with pytest.raises(ValueError):
        train_bc_policy(np.zeros((3, 2)), np.zeros((4, 1)))


def test_stack_context_repeats_first_frame():
    feats = np.array([[1.], [2.], [3.], [10.], [20.]], np.float32)   # episodes of 3 and 2 steps
    out = stack_context(feats, np.array([3, 2]), context=2)
    np.testing.assert_array_equal(out, [[1, 1], [1, 2], [2, 3], [10, 10], [10, 20]])


class CountingEnv:
    """Fake env: the frame holds the step count; success after `seed % 10` steps."""

    def __init__(self):
        self.t, self.goal = 0, 0

    def _frame(self):
        return np.full((2, 2, 3), self.t, np.uint8)

    def reset(self, seed):
        self.t, self.goal = 0, seed % 10
        return self._frame(), np.array([seed], np.float32), None

    def step(self, action):
        self.t += 1
        return self._frame(), np.array([action[0]], np.float32), None, self.t >= self.goal


class EchoPolicy:
    """Action = the newest frame's feature, so the history order is visible in `seen`."""

    def __init__(self):
        self.seen = []

    def act(self, x):
        self.seen.append(x.copy())
        return x[:, -2:-1]


def test_rollouts_stop_at_success_and_keep_history():
    calls = []

    def featurize(frames):
        calls.append(len(frames))
        return frames[:, 0, 0, :1].astype(np.float32)       # [B, 1]: the step count

    policy = EchoPolicy()
    res = run_rollouts([CountingEnv(), CountingEnv()], seeds=[2, 5, 13], policy=policy,
                       featurize=featurize, context=3, episode_length=4)
    assert res["success"] == [True, False, True]
    assert res["steps"] == [2, 4, 3] and res["decisions"] == 9
    assert calls == [2, 2, 1, 1, 1, 1, 1]                   # two envs in lockstep, then the third seed
    # first decision: the first frame fills the context; proprio = seed
    np.testing.assert_array_equal(policy.seen[0], [[0, 0, 0, 2], [0, 0, 0, 5]])
    np.testing.assert_array_equal(policy.seen[2], [[0, 1, 2, 1]])   # seed 5, third decision (proprio = last action)


class FakeBackbone:
    class inputs:  # noqa: N801
        resolution = 64


def test_settings_apply_quick_limits_and_check_resolution():
    from totobench.errors import ConfigError
    from totobench.tasks.config import load_task_config
    cfg = load_task_config("robot")
    ctx = RunContext(backbone=FakeBackbone(), layers=[0], device=torch.device("cpu"), quick=True,
                     data_root=None, artifacts_dir=None, cache=None, console=None)
    task = RobotBC(cfg)
    s = task._settings(ctx)
    assert s["demos"] == cfg.quick.demos < cfg.dataset.demos
    assert s["episode_length"] == cfg.quick.episode_length
    assert s["demo_length"] == cfg.dataset.episode_length     # demos are never cut short
    assert len(cfg.dataset.env) >= 3
    assert task.resolve_input(FakeBackbone())["resolution"] == 64
    with pytest.raises(ConfigError, match="resolution"):
        RobotBC(load_task_config("robot", ["input.resolution=128"])).resolve_input(FakeBackbone())


@pytest.mark.parametrize("override, key", [("dataset.rollouts=0", "dataset.rollouts"),
                                           ("input.context_frames=-1", "input.context_frames"),
                                           ("probe.lrate=0.1", "probe: unknown key 'lrate'")])
def test_settings_name_the_bad_key(override, key):
    from totobench.errors import ConfigError
    from totobench.tasks.config import load_task_config
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        load_task_config("robot", [override])


def test_cortexbench_variant_has_cortexbench_settings_and_names_its_camera():
    """robot-cortexbench: CortexBench's 5 MetaWorld tasks, 25 demos, 25 x 3 rollouts of 500 single-step
    decisions, 100 epochs; MetaWorld 3.1.1 has no top_cap2, so its camera is a recorded deviation."""
    from totobench.tasks.config import load_task_config
    cfg = load_task_config("robot-cortexbench")
    ctx = RunContext(backbone=FakeBackbone(), layers=[0], device=torch.device("cpu"), quick=False,
                     data_root=None, artifacts_dir=None, cache=None, console=None)
    task = RobotBC(cfg)
    s = task._settings(ctx)
    assert list(cfg.dataset.env) == ["assembly", "bin-picking", "button-press-topdown", "drawer-open", "hammer"]
    assert (s["demos"], s["rollouts"], s["episode_length"], s["action_repeat"], s["camera"]) == (25, 75, 500, 1,
                                                                                                "topview")
    assert cfg.probe.epochs == 100 and cfg.probe.hidden == (256, 256, 256)
    quick = task._settings(RunContext(backbone=FakeBackbone(), layers=[0], device=torch.device("cpu"), quick=True,
                                      data_root=None, artifacts_dir=None, cache=None, console=None))
    assert quick["rollouts"] < 75 and quick["demo_length"] == 500  # --quick: fewer episodes, full-length demos
