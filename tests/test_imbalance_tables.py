"""The weight-vs-strength and missing-modality tables, on hand-made records whose answers are
worked out by hand, and once on real runs (the logged key names of the methods)."""

from __future__ import annotations

import math

import pandas as pd
import pytest

from mmbalance.imbalance_tables import (
    WEIGHT_RULES,
    TableError,
    load_records,
    missing_modality_robustness,
    robustness_markdown,
    run_frame,
    run_weights,
    weights_markdown,
    weights_vs_strength,
)

LABELS = {"iprm": "IPRM", "ogm": "OGM-GE", "mslr": "MSLR", "unimodal": "Unimodal", "concat": "Concat",
          "reconboost": "ReconBoost", "agm": "AGM"}


def record(method, seed=0, mods=("a", "v"), dataset="toy", named=True, epochs=(), acc=80.0, probes=None,
           coalitions=None, extra=None, modality=None, unavailable=None):
    """A folded record as load_record returns it: header, per-epoch diagnostics means, final row."""
    cfg = {"method": method, "dataset": dataset, "seed": seed, "modalities": list(mods) if named else None,
           "epochs": len(epochs) or 1, **(extra or {})}
    if modality:
        cfg["modality"] = modality
    used = [modality] if modality else list(mods)
    label = f"Unimodal ({modality})" if modality else LABELS[method]
    diag = {}
    if probes is not None:
        diag["probe"] = {m: {"probe_acc": p} for m, p in probes.items()}
    if coalitions is not None:
        diag["coalitions"] = coalitions
    if unavailable:
        diag.update(coalitions=None, shapley_unavailable=unavailable)
    test = {"fused": {"acc": acc}}
    return {
        "header": {"config": cfg, "method_label": label, "modalities": used, "data_fingerprint": {"files": "x"}},
        "epochs": [{"epoch": i, "train_batches": n, "diagnostics": d} for i, (n, d) in enumerate(epochs)],
        "final": {"selection": {r: {"epoch": 0, "test": test} for r in ("last", "best_val")}, "diagnostics": diag},
        "done": True,
    }


def unimodal_runs(a=80.0, v=60.0, seeds=(0, 1), **kw):
    return [record("unimodal", s, modality=m, acc=acc + s, **kw) for s in seeds for m, acc in (("a", a), ("v", v))]


def test_run_weight_is_the_mean_over_all_steps():
    """Epoch means weighted by their batches: (10 x 1.0 + 30 x 1.4) / 40 = 1.3. An IPRM run with
    several pairs logs omega_<m>@<pair>: averaged over the pairs. NaN epochs are skipped.
    Wrong variants caught: the plain mean of epoch means (1.2), the last epoch only (1.4)."""
    rec = record("mslr", epochs=[(10, {"lr_mult_a": 1.0, "lr_mult_v": 1.0}), (30, {"lr_mult_a": 1.4, "lr_mult_v": 1.0})])
    assert run_weights(rec, WEIGHT_RULES["mslr"], ["a", "v"]) == pytest.approx({"a": 1.3, "v": 1.0})
    tri = record("iprm", mods=("a", "b", "c"), epochs=[
        (5, {"omega_a@a+b": 0.2, "omega_b@a+b": 0.8, "omega_a@a+c": 0.4, "omega_c@a+c": 0.6,
             "omega_b@b+c": 0.5, "omega_c@b+c": 0.5, "lambda_a@a+b": 9.0}),
        (5, {"omega_a@a+b": float("nan"), "omega_b@a+b": 0.8, "omega_a@a+c": 0.4, "omega_c@a+c": 0.6,
             "omega_b@b+c": 0.5, "omega_c@b+c": 0.5}),
    ])
    w = run_weights(tri, WEIGHT_RULES["iprm"], ["a", "b", "c"])
    assert w == pytest.approx({"a": (0.3 + 0.4) / 2, "b": 0.65, "c": 0.55})


def test_larger_weight_against_the_stronger_modality():
    """Unimodal runs: a alone 80.5 (mean of 80, 81), v alone 60.5, so a is stronger. IPRM gives v
    the larger omega (0.7) -> 'weaker'; MSLR gives a the larger rate -> 'stronger'; OGM-GE's two
    seeds disagree (a larger on seed 0, v on seed 1; mean v larger) -> v, 1 of 2 seeds.
    Wrong variants caught: strength from the weights instead of unimodal accuracy, argmin for
    argmax (IPRM 'a'), a seed average that ignores disagreement (seeds_agree 1)."""
    recs = unimodal_runs() + [
        record("iprm", s, epochs=[(10, {"omega_a": 0.3, "omega_v": 0.7, "lambda_a": 0.9, "lambda_v": 0.1})]) for s in (0, 1)
    ] + [
        record("mslr", s, epochs=[(10, {"lr_mult_a": 1.0, "lr_mult_v": 1.0}), (30, {"lr_mult_a": 1.4, "lr_mult_v": 0.8})])
        for s in (0, 1)
    ] + [
        record("ogm", 0, epochs=[(10, {"coeff_a": 1.0, "coeff_v": 0.9})]),
        record("ogm", 1, epochs=[(10, {"coeff_a": 0.4, "coeff_v": 1.0})]),
        record("concat", 0),
    ]
    t = weights_vs_strength(recs).set_index("method")
    assert list(t.index) == ["IPRM", "MSLR", "OGM-GE"]  # Concat weights nothing; unimodal runs are one modality
    assert t.loc["IPRM", "larger"] == "v" and t.loc["IPRM", "stronger"] == "a" and t.loc["IPRM", "to"] == "weaker"
    assert t.loc["IPRM", "strength"] == pytest.approx({"a": 80.5, "v": 60.5})
    assert t.loc["IPRM", "source"] == "unimodal runs" and t.loc["IPRM", "n"] == 2
    assert t.loc["MSLR", "larger"] == "a" and t.loc["MSLR", "to"] == "stronger"
    assert t.loc["MSLR", "weights"] == pytest.approx({"a": 1.3, "v": 0.85})
    assert t.loc["OGM-GE", "larger"] == "v" and t.loc["OGM-GE", "seeds_agree"] == 0.5
    assert t.loc["OGM-GE", "weights"] == pytest.approx({"a": 0.7, "v": 0.95})
    assert t.loc["IPRM", "weight"] == WEIGHT_RULES["iprm"].weight
    text = weights_markdown(weights_vs_strength(recs))
    assert "| IPRM " in text and "v ▽" in text and "a ▲" in text and "(1/2)" in text


def test_strength_falls_back_to_probes_then_to_nothing():
    """No unimodal runs on 'toy': the run's own probes decide (v probes higher here: 'stronger').
    strength='unimodal' then has nothing: stronger and to are None. A weight tie names nobody."""
    recs = [record("agm", s, probes={"a": 40.0, "v": 55.0}, epochs=[(4, {"coef_a": 0.8, "coef_v": 1.2})]) for s in (0, 1)]
    t = weights_vs_strength(recs).set_index("method")
    assert t.loc["AGM", "source"] == "linear probes of the run" and t.loc["AGM", "stronger"] == "v"
    assert t.loc["AGM", "to"] == "stronger"
    none = weights_vs_strength(recs, strength="unimodal").set_index("method")
    assert pd.isna(none.loc["AGM", "stronger"]) and pd.isna(none.loc["AGM", "to"])
    tie = weights_vs_strength([record("agm", probes={"a": 1.0, "v": 2.0}, epochs=[(4, {"coef_a": 1.0, "coef_v": 1.0})])])
    assert pd.isna(tie.loc[0, "larger"]) and pd.isna(tie.loc[0, "to"])
    with pytest.raises(TableError, match="strength must be"):
        weights_vs_strength(recs, strength="test")


def test_unimodal_runs_of_the_same_dataset_serve_a_setting_without_its_own():
    """A three-view setting 'toy [a+b+c]' has no unimodal runs; those of the pair settings of the
    same dataset give each view's accuracy alone (a 70, b 50, c 60)."""
    recs = [record("unimodal", 0, mods=("a", "b"), modality="a", acc=70.0),
            record("unimodal", 0, mods=("a", "b"), modality="b", acc=50.0),
            record("unimodal", 0, mods=("a", "c"), modality="c", acc=60.0),
            record("iprm", 0, mods=("a", "b", "c"), epochs=[(1, {"omega_a@a+b": 0.2, "omega_b@a+b": 0.8,
                                                                  "omega_a@a+c": 0.3, "omega_c@a+c": 0.7,
                                                                  "omega_b@b+c": 0.4, "omega_c@b+c": 0.6})])]
    t = weights_vs_strength(recs).iloc[0]
    assert t["setting"] == "toy [a+b+c]" and t["strength"] == {"a": 70.0, "b": 50.0, "c": 60.0}
    assert t["stronger"] == "a" and t["larger"] == "c" and t["to"] == "weaker"  # c: (0.7 + 0.6) / 2


def coalitions(full, a_only, v_only, none=10.0):
    return {"none": none, "a": a_only, "v": v_only, "a+v": full}


def test_missing_modality_robustness_by_hand():
    """Two seeds: all present 90 and 88; only a (v absent) 70 and 72; only v (a absent) 50 and 44.
    No v: 71 +- 1.41, drop (20 + 16) / 2 = 18; no a: 47 +- 4.24, drop (40 + 44) / 2 = 42.
    Wrong variants caught: reading 'no a' from the coalition {a} (the one where a is present),
    the drop as absent - full (negative), the test accuracy under best_val in place of the
    coalition of all modalities."""
    recs = [record("concat", 0, acc=99.0, coalitions=coalitions(90.0, 70.0, 50.0)),
            record("concat", 1, acc=99.0, coalitions=coalitions(88.0, 72.0, 44.0))]
    t = missing_modality_robustness(recs).set_index("absent")
    assert t.loc["none", "acc"] == 89.0 and t.loc["none", "drop"] == 0.0
    assert t.loc["v", "acc"] == 71.0 and t.loc["v", "drop"] == 18.0
    assert t.loc["a", "acc"] == 47.0 and t.loc["a", "drop"] == 42.0
    assert t.loc["a", "std"] == pytest.approx(math.sqrt(18.0)) and (t["n"] == 2).all()
    text = robustness_markdown(missing_modality_robustness(recs))
    assert "*toy [a+v]*" in text and "47.00 ± 4.24 (-42.00)" in text and "| no a " in text


def test_three_modalities_drop_one_at_a_time_and_unavailable_methods_are_named():
    full = {"none": 5.0, "a": 30.0, "b": 20.0, "c": 25.0, "a+b": 60.0, "a+c": 70.0, "b+c": 40.0, "a+b+c": 80.0}
    recs = [record("concat", 0, mods=("a", "b", "c"), coalitions=full),
            record("reconboost", 0, unavailable="its predict() does not go through model.encode()"),
            record("unimodal", 0, modality="a")]
    t = missing_modality_robustness(recs)
    three = t[t["setting"] == "toy [a+b+c]"].set_index("absent")["acc"].to_dict()
    assert three == {"none": 80.0, "a": 40.0, "b": 70.0, "c": 60.0}
    recon = t[t["method"] == "ReconBoost"].iloc[0]
    assert pd.isna(recon["absent"]) and "model.encode" in recon["note"]
    assert "Unimodal (a)" not in set(t["method"])  # one modality: nothing to take away
    assert "N/A: its predict()" in robustness_markdown(t)


def test_differing_configs_are_not_averaged_and_bad_input_is_refused():
    recs = [record("iprm", 0, coalitions=coalitions(90.0, 70.0, 50.0), extra={"alpha": 0.8}),
            record("iprm", 0, coalitions=coalitions(80.0, 60.0, 40.0), extra={"alpha": 0.1})]
    t = missing_modality_robustness(recs)
    assert set(t["method"]) == {"IPRM (alpha=0.8)", "IPRM (alpha=0.1)"}
    assert run_frame(recs)["setting"].tolist() == ["toy [a+v]"] * 2
    unnamed = run_frame([record("concat", named=False, coalitions=coalitions(1, 2, 3))])
    assert unnamed["setting"].tolist() == ["toy"]
    with pytest.raises(TableError, match="folded records"):
        run_frame([{"config": {}}])
    with pytest.raises(TableError, match="No finished runs"):
        missing_modality_robustness([])
    with pytest.raises(TableError, match="rule 'best_test'"):
        run_frame(recs, rule="best_test")
    # a DataFrame from run_frame is accepted as well as the records
    pd.testing.assert_frame_equal(missing_modality_robustness(run_frame(recs)), t)


def test_real_runs_log_the_keys_the_table_reads(shared_data, fast, one_intra_op_thread):
    """IPRM, OGM-GE and a unimodal run on the real image-seg set (1 epoch each): the weights come
    from the keys the methods really log, the strength from the unimodal runs, and the
    absent-modality accuracies from the diagnostics the trainer really writes."""
    from mmbalance.runner import run

    ov = {**fast, "data_root": str(shared_data), "epochs": 1}
    for method, extra in (("iprm", {}), ("ogm", {}), ("unimodal", {"modality": "color"}), ("unimodal", {"modality": "shape"})):
        run(method, "image-seg", {**ov, **extra, **({"diagnostics": False} if method == "unimodal" else {})})
    recs = load_records(fast["records"])
    t = weights_vs_strength(recs).set_index("method")
    assert set(t.index) == {"IPRM", "OGM-GE"}
    for m in t.index:
        assert set(t.loc[m, "weights"]) == {"color", "shape"} and t.loc[m, "source"] == "unimodal runs"
        assert t.loc[m, "larger"] in ("color", "shape") and t.loc[m, "to"] in ("stronger", "weaker")
    assert t.loc["IPRM", "weights"]["color"] + t.loc["IPRM", "weights"]["shape"] == pytest.approx(1.0)
    r = missing_modality_robustness(recs)
    assert set(r["method"]) == {"IPRM", "OGM-GE"} and set(r["absent"]) == {"none", "color", "shape"}
    assert r["acc"].between(0, 100).all()
