"""MetaWorld rendering and seeded rollouts (needs mujoco + metaworld, offscreen GL via osmesa)."""

import numpy as np
import pytest

from totobench.data.robot import RobotEnv, load_or_record_demos, metaworld_name  # sets MUJOCO_GL first

pytest.importorskip("metaworld")

from totobench.errors import ConfigError

R = 64


@pytest.fixture(scope="module")
def env():
    e = RobotEnv("button-press-topdown", resolution=R)
    yield e
    e.close()


def expert_episode(env, seed, steps=25):
    frame, _, _ = env.reset(seed)
    frames, success = [frame], False
    for _ in range(steps):
        frame, _, _, ok = env.step(env.expert_action())
        frames.append(frame)
        success = success or ok
    return np.stack(frames), success


def test_seeded_rollout_is_rendered_and_reproducible(env):
    frames, success = expert_episode(env, seed=5000)
    assert frames.shape == (26, R, R, 3) and frames.dtype == np.uint8
    assert frames[0].std() > 20                                   # a scene, not a blank image
    assert len(np.unique(frames[0].reshape(-1, 3), axis=0)) > 50
    assert np.abs(frames[-1].astype(int) - frames[0]).mean() > 1  # the arm moved
    assert success                                                # expert presses within 25 decisions
    again, success_again = expert_episode(env, seed=5000)
    assert success_again == success
    np.testing.assert_array_equal(again, frames)
    other, _ = expert_episode(env, seed=5001, steps=0)
    assert not np.array_equal(other[0], frames[0])                # another seed, another scene


def red_row(img):
    """Mean image row of the (red) robot arm's pixels."""
    mask = (img[..., 0] > 100) & (img[..., 1] < 60) & (img[..., 2] < 60)
    return np.nonzero(mask)[0].mean()


def test_frames_are_upright(env):
    start, p0, _ = env.reset(0)
    for _ in range(10):
        up, p_up, _, _ = env.step(np.array([0, 0, 1, 0]))      # raise the hand ~26 cm
    for _ in range(20):
        down, p_down, _, _ = env.step(np.array([0, 0, -1, 0]))
    assert p_up[2] > p0[2] + 0.2 and p_down[2] < p0[2]
    # image rows grow downwards: a raised arm must move up in an upright image
    assert red_row(up) < red_row(start) - 1.5
    assert red_row(down) > red_row(up) + 1.5


def test_demos_are_cached(tmp_path):
    a, path = load_or_record_demos(tmp_path, "button-press-topdown", 2, 32, episode_length=30)
    assert path.exists() and a["frames"].shape[:2] == (2, 30)
    assert a["success"].all() and (a["success_step"] >= 0).all()
    assert (a["length"] == np.minimum(a["success_step"] + 6, 30)).all()   # 5 decisions past success
    assert np.abs(a["actions"]).max() <= 1.0
    b, path_b = load_or_record_demos(tmp_path, "button-press-topdown", 1, 32, episode_length=30)
    assert path_b == path                                       # a larger file is reused
    np.testing.assert_array_equal(b["frames"][0], a["frames"][0])


def test_unknown_env_names_close_matches():
    assert metaworld_name("drawer-open") == "drawer-open-v3"
    with pytest.raises(ConfigError, match="drawer-open"):
        metaworld_name("drawer-opn")
