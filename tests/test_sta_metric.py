"""Ego4D STA Top-5 mAP on cases worked out by hand, and the prediction-file validation."""

import json

import numpy as np
import pytest

from totobench.cli import main
from totobench.errors import DataError
from totobench.metrics.ego4d_sta import (CHALLENGE, box_iou, sta_top5_map,
                                         validate_sta_predictions)

GT_BOX = [0, 0, 9, 9]  # 10 x 10 = 100 px with the end pixel counted (81 without)


def obj(box=GT_BOX, noun=1, verb=2, ttc=1.0):
    return {"box": list(box), "noun_category_id": noun, "verb_category_id": verb, "time_to_contact": ttc}


def det(box=GT_BOX, noun=1, verb=2, ttc=1.0, score=0.9):
    return {"box": [float(v) for v in box], "noun_category_id": noun, "verb_category_id": verb,
            "time_to_contact": float(ttc), "score": float(score)}


def annotations(*frames):
    """frames: lists of objects; uids f0, f1, ..."""
    return {"version": "1", "info": {"noun_categories": [], "verb_categories": []},
            "annotations": [{"uid": f"f{i}", "video_uid": "v", "frame": i, "objects": objs}
                            for i, objs in enumerate(frames)]}


def preds(*frames):
    return {"version": "1.0", "challenge": CHALLENGE,
            "results": {f"f{i}": dets for i, dets in enumerate(frames)}}


def all4(a, b, c, d):
    return {"Noun": a, "Noun+Verb": b, "Noun+TTC": c, "Overall": d}


def test_perfect_prediction_is_100_everywhere():
    ann = annotations([obj(noun=1), obj([20, 20, 39, 49], noun=2, verb=0, ttc=0.4)], [obj(noun=2, ttc=2.5)])
    pred = preds([det(noun=1), det([20, 20, 39, 49], noun=2, verb=0, ttc=0.4, score=0.5)],
                 [det(noun=2, ttc=2.5, score=0.7)])
    validate_sta_predictions(pred, ann)
    assert sta_top5_map(ann, pred) == all4(100.0, 100.0, 100.0, 100.0)


def test_box_iou_counts_the_end_pixel():
    gt = np.array([GT_BOX], dtype=float)
    # [0,0,9,4.5]: (5.5 x 10) / 100 = 0.55 with the +1 rule, 4.5*9/81 = 0.5 without it
    iou = box_iou(np.array([[0, 0, 9, 4.5], [0, 0, 9, 4], [20, 20, 30, 30]], dtype=float), gt)
    assert iou[:, 0] == pytest.approx([0.55, 0.5, 0.0])


@pytest.mark.parametrize("y2, matched", [(3.9, False),   # IoU 0.49
                                         (4.0, False),   # IoU exactly 0.5: must be strictly above
                                         (4.1, True),    # IoU 0.51
                                         (4.5, True)])   # 0.55 only because areas count +1 pixel
def test_iou_just_below_and_above_half(y2, matched):
    ann = annotations([obj()])
    value = 100.0 if matched else 0.0
    assert sta_top5_map(ann, preds([det([0, 0, 9, y2])])) == all4(value, value, value, value)


@pytest.mark.parametrize("ttc, ttc_ok", [(1.2, True), (1.25, True), (1.3, False), (0.7, False)])
def test_ttc_error_within_a_quarter_second(ttc, ttc_ok):
    ann = annotations([obj(ttc=1.0)])
    value = 100.0 if ttc_ok else 0.0
    assert sta_top5_map(ann, preds([det(ttc=ttc)])) == all4(100.0, 100.0, value, value)


def test_wrong_verb_only_fails_the_verb_variants():
    ann = annotations([obj(verb=2)])
    assert sta_top5_map(ann, preds([det(verb=3)])) == all4(100.0, 0.0, 100.0, 0.0)


def test_false_positives_inside_the_top5_budget_are_forgiven():
    # one ground truth -> the first (5-1)*1 = 4 false positives by score are discarded
    ann = annotations([obj()])
    far = [50, 50, 59, 59]
    fps = [det(far, score=s) for s in (0.9, 0.8, 0.7, 0.6)]
    assert sta_top5_map(ann, preds(fps + [det(score=0.5)]))["Noun"] == 100.0


def test_false_positive_beyond_the_budget_counts():
    # 5 false positives above the true one: the 5th stays, so the ranking is FP, TP:
    # precision 1/2 at recall 1 -> AP 50
    ann = annotations([obj()])
    far = [50, 50, 59, 59]
    fps = [det(far, score=s) for s in (0.9, 0.8, 0.7, 0.6, 0.55)]
    assert sta_top5_map(ann, preds(fps + [det(score=0.5)])) == all4(50.0, 50.0, 50.0, 50.0)
    # the budget is spent by score whatever the noun: 4 FPs of noun 7 (absent from the ground truth,
    # so not averaged) use it up and the one FP of noun 1 counts
    fps = [det(far, noun=7, score=s) for s in (0.9, 0.8, 0.7, 0.6)] + [det(far, score=0.55)]
    assert sta_top5_map(ann, preds(fps + [det(score=0.5)]))["Noun"] == 50.0
    # a false positive below the true one never lowers the AP
    fps = [det(far, score=s) for s in (0.4, 0.3, 0.2, 0.1, 0.05)]
    assert sta_top5_map(ann, preds([det(score=0.5)] + fps))["Noun"] == 100.0


def test_voc_interpolated_ap_across_frames():
    # noun 1: 2 ground truths in 2 frames; ranking TP(0.9), FP(0.8), TP(0.7):
    # precision 1, 1/2, 2/3 at recall 1/2, 1/2, 1 -> envelope 1, 2/3 -> AP = 0.5*1 + 0.5*2/3
    ann = annotations([obj()], [obj()])
    pred = preds([det(score=0.9), det([50, 50, 59, 59], score=0.8)], [det(score=0.7)])
    assert sta_top5_map(ann, pred, top_k=1)["Noun"] == pytest.approx(100 * (0.5 + 1 / 3))
    assert sta_top5_map(ann, pred)["Noun"] == 100.0  # with k=5 that FP is forgiven


def test_mean_over_noun_classes_of_the_ground_truth():
    # noun 1 found (AP 100), noun 2 missed (AP 0), noun 9 predicted but absent from the ground truth
    ann = annotations([obj(noun=1), obj([30, 30, 39, 39], noun=2)])
    pred = preds([det(noun=1), det([30, 30, 39, 39], noun=9, score=0.8)])
    assert sta_top5_map(ann, pred) == all4(50.0, 50.0, 50.0, 50.0)


def test_greedy_matching_by_score_each_gt_once_per_variant():
    ann = annotations([obj(ttc=1.0)])
    # the higher-scored prediction takes the ground truth for Noun; its ttc is off, so for
    # Noun+TTC the lower-scored one matches instead: ranking FP, TP -> AP 50
    pred = preds([det([0, 0, 9, 6], ttc=2.0, score=0.9), det(ttc=1.0, score=0.8)])
    assert sta_top5_map(ann, pred, top_k=1) == all4(100.0, 100.0, 50.0, 50.0)
    # a duplicate of the matched prediction is a false positive (the ground truth is taken)
    pred = preds([det(score=0.9), det(score=0.8), det(score=0.7)])
    assert sta_top5_map(ann, pred, top_k=1)["Noun"] == 100.0  # FPs after the TP
    pred = preds([det([50, 50, 59, 59], score=0.95), det(score=0.9), det(score=0.8)])
    assert sta_top5_map(ann, pred, top_k=1)["Noun"] == 50.0


def test_frame_without_predictions_contributes_nothing():
    ann = annotations([obj()], [obj([20, 20, 29, 29])])
    # frame 1 has no predictions: its ground truth is not counted, so frame 0 alone gives 100
    assert sta_top5_map(ann, preds([det()], []))["Noun"] == 100.0
    # with one (wrong) prediction in frame 1 its ground truth counts: recall 1/2 -> AP 50
    assert sta_top5_map(ann, preds([det()], [det([60, 60, 69, 69], noun=3)]))["Noun"] == 50.0


def test_no_predictions_at_all_is_nan():
    values = sta_top5_map(annotations([obj()]), preds([]))
    assert all(np.isnan(v) for v in values.values())


@pytest.mark.parametrize("mutate, message", [
    (lambda p: p["results"].pop("f1"), "uid 'f1' missing from field 'results'"),
    (lambda p: p["results"]["f0"][0].update(noun_category_id="1"),
     "uid 'f0' detection 0: field 'noun_category_id' must be an integer, got '1' (str)"),
    (lambda p: p["results"]["f0"][0].update(box=[0.0, 0.0, 9.0]),
     "uid 'f0' detection 0: field 'box' must be a list of 4 numbers"),
    (lambda p: p["results"]["f0"][0].update(score=1), "field 'score' must be a finite float, got 1 (int)"),
    (lambda p: p["results"]["f0"][0].update(verb_category_id=2.0), "field 'verb_category_id' must be an integer"),
    (lambda p: p["results"]["f0"][0].pop("time_to_contact"), "missing field 'time_to_contact'"),
    (lambda p: p.pop("version"), "missing top-level field 'version'"),
    (lambda p: p.update(challenge="ego4d_lta"), "field 'challenge' must be"),
])
def test_validation_errors_name_uid_and_field(mutate, message):
    ann = annotations([obj()], [obj()])
    pred = preds([det()], [det()])
    validate_sta_predictions(pred, ann)
    mutate(pred)
    with pytest.raises(DataError) as err:
        validate_sta_predictions(pred, ann)
    assert message in str(err.value)
    assert "\n" not in str(err.value)


def test_cli_writes_json_and_reports_bad_files(tmp_path, capsys):
    ann = annotations([obj()], [obj([20, 20, 29, 29])])
    (tmp_path / "ann.json").write_text(json.dumps(ann))
    (tmp_path / "pred.json").write_text(json.dumps(preds([det()], [det([60, 60, 69, 69], noun=3)])))
    out = tmp_path / "metrics.json"
    assert main(["sta-eval", str(tmp_path / "ann.json"), str(tmp_path / "pred.json"), "--json", str(out)]) == 0
    assert json.loads(out.read_text()) == all4(50.0, 50.0, 50.0, 50.0)
    assert "Overall" in capsys.readouterr().out

    (tmp_path / "bad.json").write_text(json.dumps(preds([det()])))  # f1 missing
    assert main(["sta-eval", str(tmp_path / "ann.json"), str(tmp_path / "bad.json")]) == 2
    err = capsys.readouterr().err
    assert "uid 'f1' missing" in err and "bad.json" in err and err.count("\n") == 1


def test_cli_refuses_a_test_split_and_a_missing_prediction_file(tmp_path, capsys):
    ann = annotations([obj()])
    (tmp_path / "pred.json").write_text(json.dumps(preds([det()])))
    del ann["annotations"][0]["objects"]                       # a test split: no ground truth
    (tmp_path / "test.json").write_text(json.dumps(ann))
    assert main(["sta-eval", str(tmp_path / "test.json"), str(tmp_path / "pred.json")]) == 2
    err = capsys.readouterr().err
    assert f"{tmp_path / 'test.json'}: uid 'f0' has no field 'objects'" in err and err.count("\n") == 1

    (tmp_path / "ann.json").write_text(json.dumps(annotations([obj()])))
    assert main(["sta-eval", str(tmp_path / "ann.json"), str(tmp_path / "absent.json")]) == 2
    assert f"{tmp_path / 'absent.json'}: prediction file not found" in capsys.readouterr().err


def test_v2_file_with_video_id_through_load_sta(tmp_path):
    from totobench.data.ego4d import load_sta
    ann = annotations([obj(noun=1)], [obj([20, 20, 29, 29], noun=0, verb=1)])
    ann["info"] = {"noun_categories": [{"id": 0, "name": "cup"}, {"id": 1, "name": "knife"}],
                   "verb_categories": [{"id": 0, "name": "take"}, {"id": 1, "name": "cut"},
                                       {"id": 2, "name": "put"}], "video_metadata": {}}
    for entry in ann["annotations"]:
        entry["video_id"] = entry.pop("video_uid")
    (tmp_path / "fho_sta_val.json").write_text(json.dumps(ann))
    loaded = load_sta(tmp_path / "fho_sta_val.json")
    pred = preds([det(noun=1)], [det([20, 20, 29, 29], noun=0, verb=0)])
    validate_sta_predictions(pred, loaded)
    assert sta_top5_map(loaded, pred) == all4(100.0, 50.0, 100.0, 50.0)
