"""Prior analysis: similarity matrices vs hand computation, clustering, files, CLI, and a short
training run in which a structure shared across modalities shows up in the priors."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import yaml

import hermes.models as hm
from hermes.analysis.priors import (
    analyse_priors,
    cluster_order,
    modality_prior_similarity,
    nearest_neighbours,
    read_matrix_csv,
    task_prior_similarity,
)

TASKS = ["a/liver", "a/kidney", "b/liver", "b/spleen", "c/x"]
GROUPS = {"a": {"tasks": ["a/liver", "a/kidney"], "modality": "CT"},
          "b": {"tasks": ["b/liver", "b/spleen"], "modality": "T1"}}


def _model() -> hm.HermesResUNet:
    torch.manual_seed(2)
    m = hm.build("tiny", tasks=TASKS, modalities=["CT", "T1", "T2"], groups=GROUPS)
    with torch.no_grad():
        for f in m.fusion:
            f.task_priors.normal_()
            f.modality_priors.normal_()
    return m


def _cos(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().double().flatten(), b.detach().double().flatten()
    return float((a @ b) / (a.norm() * b.norm()))


def test_tasks_of_a_decoder_branch_use_the_branch_tables():
    from hermes.models.extend import add_decoder_branch

    m = add_decoder_branch(_model(), 3)  # b/spleen and c/x belong to the branch
    with torch.no_grad():
        for f in m.branches[0].fusion:
            f.task_priors.normal_()
    res = task_prior_similarity(m)
    for lvl, (main, branch) in enumerate(zip(m.fusion[3:], m.branches[0].fusion, strict=True)):
        rows = [main.task_priors[i] for i in range(3)] + [branch.task_priors[i] for i in (3, 4)]
        for i in range(5):
            for j in range(5):
                exp = _cos(rows[i], rows[j])
                assert res.levels[3 + lvl][i, j] == pytest.approx(exp, abs=1e-12)
    assert res.levels[0][3, 4] == pytest.approx(
        _cos(m.fusion[0].task_priors[3], m.fusion[0].task_priors[4]), abs=1e-12)


def test_similarities_match_hand_computation():
    m = _model()
    m.vocab.reserved.append("c/x")
    res = task_prior_similarity(m)
    assert res.names == TASKS[:4]  # reserved task and null row skipped
    assert len(res.levels) == 5
    for lvl, f in enumerate(m.fusion):
        for i in range(4):
            for j in range(4):
                exp = _cos(f.task_priors[i], f.task_priors[j])
                assert res.levels[lvl][i, j] == pytest.approx(exp, abs=1e-12)
    # concatenation of per-level unit vectors = the mean of the per-level cosines
    for i in range(4):
        for j in range(4):
            exp = sum(_cos(f.task_priors[i], f.task_priors[j]) for f in m.fusion) / 5
            assert res.concat[i, j] == pytest.approx(exp, abs=1e-12)
    mod = modality_prior_similarity(m)
    assert mod.names == ["CT", "T1", "T2"]
    f = m.fusion[2]
    assert mod.levels[2][0, 1] == pytest.approx(_cos(f.modality_priors[0], f.modality_priors[1]),
                                                abs=1e-12)
    mean = modality_prior_similarity(m, reduce="mean")
    assert mean.levels[2][0, 2] == pytest.approx(
        _cos(f.modality_priors[0].double().mean(0), f.modality_priors[2].double().mean(0)),
        abs=1e-12)


def test_group_centering_by_hand():
    m = _model()
    res = task_prior_similarity(m, center="groups")
    f = m.fusion[1]
    p = f.task_priors.detach().double()
    a_liver = p[0] - (p[0] + p[1]) / 2
    b_liver = p[2] - (p[2] + p[3]) / 2
    assert res.levels[1][0, 2] == pytest.approx(_cos(a_liver, b_liver), abs=1e-12)
    # c/x is in no group: left as it is
    assert res.levels[1][2, 4] == pytest.approx(_cos(b_liver, p[4]), abs=1e-12)
    with pytest.raises(ValueError):
        task_prior_similarity(m, center="mean")


def test_cluster_order_keeps_blocks_together():
    rng = np.random.default_rng(0)
    block = [0, 3, 5]  # a tight cluster hidden among others
    v = rng.normal(size=(7, 16))
    v[block] = v[0] + 0.01 * rng.normal(size=(3, 16))
    u = v / np.linalg.norm(v, axis=1, keepdims=True)
    order = cluster_order(u @ u.T)
    assert sorted(order) == list(range(7))
    pos = sorted(order.index(i) for i in block)
    assert pos[-1] - pos[0] == 2  # contiguous in the heatmap order


def test_nearest_neighbours_and_files(tmp_path):
    m = _model()
    with torch.no_grad():  # make b/liver a near copy of a/liver at every level
        for f in m.fusion:
            f.task_priors[2] = f.task_priors[0] + 0.01 * torch.randn_like(f.task_priors[0])
    res = task_prior_similarity(m)
    nn = nearest_neighbours(res, k=2)
    assert nn["a/liver"][0][0] == "b/liver" and nn["b/liver"][0][0] == "a/liver"
    assert len(nn["a/kidney"]) == 2 and all(n != "a/kidney" for n, _ in nn["a/kidney"])
    summary = analyse_priors(m, tmp_path, k=2, png_levels=False)
    names, mat = read_matrix_csv(tmp_path / "task_similarity_concat.csv")
    assert names == TASKS and np.allclose(mat, res.concat, atol=1e-6)
    names, mat = read_matrix_csv(tmp_path / "modality_similarity_level3.csv")
    assert names == ["CT", "T1", "T2"] and np.allclose(np.diag(mat), 1.0)
    for f in ("task_similarity_concat.png", "modality_similarity_concat.png"):
        assert (tmp_path / f).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not (tmp_path / "task_similarity_level5.png").exists()
    assert (tmp_path / "task_similarity_level5.csv").exists()
    text = (tmp_path / "nearest_neighbours.txt").read_text()
    assert any(line.startswith("a/liver") and "b/liver" in line.split()[1]
               for line in text.splitlines())
    assert summary["task_nearest"]["b/liver"][0][0] == "a/liver"
    assert set(summary["cluster_order"]["task"]) == set(TASKS)
    # a second analysis replaces the first only when forced, and then leaves none of the first
    # one's heatmaps behind
    with pytest.raises(FileExistsError, match="already holds modality_similarity_concat.csv"):
        analyse_priors(m, tmp_path, k=2, png=False)
    summary = analyse_priors(m, tmp_path, k=2, png=False, force=True)
    assert not list(tmp_path.glob("*.png"))
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        summary["files"] + ["summary.json"])
    with pytest.raises(ValueError, match="at least 1"):
        analyse_priors(m, tmp_path, k=0)
    # a user's own files of these names are not replaced unforced; a file as the folder: named
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "summary.json").write_text("my notes")
    with pytest.raises(FileExistsError, match="mine already holds summary.json"):
        analyse_priors(m, mine, png=False)
    assert (mine / "summary.json").read_text() == "my notes"
    with pytest.raises(FileExistsError, match="summary.json is a file: .* needs a folder"):
        analyse_priors(m, mine / "summary.json", png=False)


def test_cli_priors(tmp_path, capsys):
    from hermes.cli import main

    hm.save(_model(), tmp_path / "m.hermes")
    assert main(["priors", str(tmp_path / "m.hermes"), "--out", str(tmp_path / "o"),
                 "--no-png", "--top", "1"]) == 0
    out = capsys.readouterr().out
    assert "a/liver" in out and "files written" in out
    assert (tmp_path / "o" / "task_similarity_level1.csv").exists()
    assert not list((tmp_path / "o").glob("*.png"))


def test_cli_priors_of_official_weights(official_fixture, tmp_path, capsys):
    """Official Hermes-R .pth weights are analysed as `hermes tasks` and `segment` read them
    (priors refused them as "not a Hermes checkpoint")."""
    from hermes.cli import main

    torch.save(official_fixture["official_state_dict"], tmp_path / "hermes_r.pth")
    assert main(["priors", str(tmp_path / "hermes_r.pth"), "--out", str(tmp_path / "o"),
                 "--no-png", "--top", "1"]) == 0
    assert "files written" in capsys.readouterr().out


def test_shared_structure_is_nearest_neighbour_after_training(tmp_path):
    """CT and T1 datasets both label the liver (as separate tasks). After a short joint run the
    two liver priors are mutual nearest neighbours (dataset-centred similarity).

    Kept small for CI: 2 cases per dataset at 6 mm, 30 steps of 32x24x24 crops, priors
    initialised near zero (x0.01) so that the learned part dominates after so few steps.
    """
    import hermes.data as hd
    from hermes.data.synthetic import generate_collection
    from hermes.training import TrainConfig, Trainer

    y = generate_collection(tmp_path / "src", seed=3, cases_per_dataset=2,
                            datasets=("synth_ct", "synth_t1"), size=(24, 32))
    cfg = yaml.safe_load(y.read_text())
    cfg.pop("shared_tasks")  # separate tasks synth_ct/liver and synth_t1/liver
    y.write_text(yaml.safe_dump(cfg, sort_keys=False))
    hd.preprocess(hd.load_collection(y), tmp_path / "cache", workers=1, progress=False,
                  image_order=1, spacing=6.0)
    tc = TrainConfig(cache_dir=str(tmp_path / "cache"), out_dir=str(tmp_path / "run"),
                     crop_size=(32, 24, 24), batch_size=2, steps=30, workers=0, lr=3e-3,
                     augment=False, ema_decay=0.0, checkpoint_every=10**6, progress=False,
                     tensorboard=False, seed=0)
    trainer = Trainer(tc)
    with torch.no_grad():
        for f in trainer.model.fusion:
            f.task_priors.mul_(0.01)
    model = hm.load(trainer.run())
    nn = nearest_neighbours(task_prior_similarity(model, center="groups"), k=1)
    assert nn["synth_t1/liver"][0][0] == "synth_ct/liver"
    assert nn["synth_ct/liver"][0][0] == "synth_t1/liver"
    assert math.isfinite(nn["synth_ct/liver"][0][1]) and nn["synth_ct/liver"][0][1] > 0
