"""What the learned context priors encode: cosine similarities, clustering, nearest neighbours.

For a model with fusion levels ``l = 1..5``:

* task prior of task ``t`` at level ``l``: row ``t`` of ``fusion[l].task_priors`` (C_l values;
  a task added with its own decoder branch: the branch's tables at the two decoder levels);
  the null row and reserved tasks are skipped;
* modality prior of modality ``m`` at level ``l``: ``fusion[l].modality_priors[m]`` (K x C_l),
  flattened to K*C_l values (tokens compared position by position) or averaged over its K tokens
  (``modality_reduce="mean"``);
* per-level similarity ``S_l[i, j] = cos(v_i^l, v_j^l)``;
* concatenated similarity: every level's vectors are L2-normalised first, then concatenated, so
  ``S[i, j] = mean_l S_l[i, j]`` (no level dominates because it is wider or larger).

:func:`analyse_priors` writes the matrices as CSV (names in the first row and column), clustered
heatmaps as PNG (order from average-linkage hierarchical clustering on ``1 - S``), a text summary
of every task's nearest neighbours and a JSON summary. ``hermes priors MODEL --out DIR``.
"""

from __future__ import annotations

import csv
import io
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from hermes._text import first_of
from hermes.files import atomic_write_bytes, atomic_write_json
from hermes.models.checkpoint import unwrap

__all__ = [
    "SimilarityResult",
    "analyse_priors",
    "cluster_order",
    "cosine_similarity",
    "modality_prior_similarity",
    "nearest_neighbours",
    "task_prior_similarity",
]


@dataclass
class SimilarityResult:
    """Cosine similarities between named priors.

    Attributes:
        names: N names (rows and columns).
        levels: per fusion level an N x N float64 matrix.
        concat: N x N, the similarity of the level-normalised concatenation (mean of ``levels``).
    """

    names: list[str]
    levels: list[np.ndarray]
    concat: np.ndarray


def cosine_similarity(vectors: np.ndarray, eps: float = 1e-12) -> np.ndarray:
    """N x D -> N x N cosine similarities (float64; zero vectors give 0)."""
    v = np.asarray(vectors, np.float64)
    norm = np.linalg.norm(v, axis=1, keepdims=True)
    u = v / np.maximum(norm, eps)
    return np.clip(u @ u.T, -1.0, 1.0)


def _similarity(per_level: list[np.ndarray], names: list[str]) -> SimilarityResult:
    """per_level: list of N x D_l arrays."""
    levels = [cosine_similarity(v) for v in per_level]
    unit = [v / np.maximum(np.linalg.norm(v, axis=1, keepdims=True), 1e-12) for v in per_level]
    concat = cosine_similarity(np.concatenate(unit, axis=1))
    return SimilarityResult(list(names), levels, concat)


def _fusion_layers(model) -> list:
    model = unwrap(model)
    return list(model.fusion)


def _task_tables(model) -> list[torch.Tensor]:
    """Per level, the (T + 1) x C task-prior table a task is segmented with: at the decoder
    levels, the rows of tasks owned by a decoder branch come from that branch's tables."""
    model = unwrap(model)
    tables = [f.task_priors.detach() for f in model.fusion]
    n = tables[0].shape[0]
    owner = model.decoder_of(torch.arange(n))
    owner[-1] = -1  # the null row
    for k, branch in enumerate(model.branches):
        for level, f in zip((3, 4), branch.fusion, strict=True):
            tables[level] = torch.where((owner == k)[:, None], f.task_priors.detach(),
                                        tables[level])
    return tables


def _group_of(vocab, names: list[str]) -> list[list[int]]:
    """Positions (in ``names``) of each dataset group's tasks; a task counts in its first group."""
    pos = {n: i for i, n in enumerate(names)}
    seen: set[str] = set()
    out = []
    for spec in vocab.groups.values():
        members = [pos[t] for t in spec.get("tasks", []) if t in pos and t not in seen]
        seen.update(names[i] for i in members)
        if members:
            out.append(members)
    return out


def task_prior_similarity(model, center: str = "none") -> SimilarityResult:
    """Cosine similarities of the task priors of every usable task (null row, reserved skipped).

    Args:
        center: ``"none"`` (the priors as learned) or ``"groups"``: per level, subtract from each
            task prior the mean prior of its dataset group (the vocabulary's groups; tasks in no
            group are left as they are). This removes what all tasks of one dataset share (its
            context: modality, field of view, co-training) so structure identity dominates; a
            one-task group becomes a zero vector (similarity 0).
    """
    if center not in ("none", "groups"):
        raise ValueError("center must be 'none' or 'groups'")
    vocab = unwrap(model).vocab
    names = vocab.usable_tasks()
    rows = [vocab.task_index(n) for n in names]
    with torch.no_grad():
        per_level = [t.double().cpu().numpy()[rows] for t in _task_tables(model)]
    if center == "groups":
        groups = _group_of(vocab, names)
        for v in per_level:
            for members in groups:
                v[members] -= v[members].mean(axis=0)
    return _similarity(per_level, names)


def modality_prior_similarity(model, reduce: str = "flatten") -> SimilarityResult:
    """Cosine similarities of the modality priors (M x K x C per level).

    Args:
        reduce: ``"flatten"`` (K*C values, tokens matched by position) or ``"mean"`` (mean token).
    """
    if reduce not in ("flatten", "mean"):
        raise ValueError("reduce must be 'flatten' or 'mean'")
    vocab = unwrap(model).vocab
    per_level = []
    with torch.no_grad():
        for f in _fusion_layers(model):
            p = f.modality_priors.detach().double().cpu().numpy()  # M x K x C
            per_level.append(p.reshape(p.shape[0], -1) if reduce == "flatten" else p.mean(1))
    return _similarity(per_level, list(vocab.modalities))


def cluster_order(similarity: np.ndarray) -> list[int]:
    """Leaf order of average-linkage hierarchical clustering on the distance ``1 - S``."""
    n = similarity.shape[0]
    if n < 3:
        return list(range(n))
    from scipy.cluster.hierarchy import leaves_list, linkage
    from scipy.spatial.distance import squareform

    dist = np.clip(1.0 - np.asarray(similarity, np.float64), 0.0, 2.0)
    dist = (dist + dist.T) / 2
    np.fill_diagonal(dist, 0.0)
    z = linkage(squareform(dist, checks=False), method="average", optimal_ordering=True)
    return [int(i) for i in leaves_list(z)]


def nearest_neighbours(result: SimilarityResult, k: int = 3) -> dict[str, list[tuple[str, float]]]:
    """For each name, its ``k`` most similar other names by the concatenated similarity."""
    out = {}
    s = result.concat
    for i, name in enumerate(result.names):
        order = [j for j in np.argsort(-s[i], kind="stable") if j != i][:k]
        out[name] = [(result.names[j], float(s[i, j])) for j in order]
    return out


def write_matrix_csv(path: str | os.PathLike, names: list[str], matrix: np.ndarray) -> None:
    """CSV with a header row ``name, n_1, ..., n_N`` and one row per name (written
    atomically)."""
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["name", *names])
    for name, row in zip(names, matrix, strict=True):
        w.writerow([name, *(f"{v:.6f}" for v in row)])
    atomic_write_bytes(path, [buf.getvalue().encode()])


def read_matrix_csv(path: str | os.PathLike) -> tuple[list[str], np.ndarray]:
    """Inverse of :func:`write_matrix_csv`."""
    with open(path, newline="") as f:
        rows = list(csv.reader(f))
    names = rows[0][1:]
    return names, np.array([[float(v) for v in r[1:]] for r in rows[1:]], np.float64)


def plot_heatmap(path: str | os.PathLike, names: list[str], matrix: np.ndarray,
                 title: str) -> list[int]:
    """Clustered heatmap PNG (rows/columns in :func:`cluster_order`); returns the order."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    order = cluster_order(matrix)
    m = matrix[np.ix_(order, order)]
    labels = [names[i] for i in order]
    n = len(names)
    size = max(4.0, 0.32 * n + 2.5)
    fig, ax = plt.subplots(figsize=(size + 1.2, size))
    im = ax.imshow(m, vmin=-1, vmax=1, cmap="RdBu_r")
    ax.set_xticks(range(n), labels, rotation=90, fontsize=7)
    ax.set_yticks(range(n), labels, fontsize=7)
    if n <= 16:
        for i in range(n):
            for j in range(n):
                ax.text(j, i, f"{m[i, j]:.2f}", ha="center", va="center", fontsize=6,
                        color="white" if abs(m[i, j]) > 0.6 else "black")
    ax.set_title(title, fontsize=9)
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04, label="cosine similarity")
    fig.tight_layout()
    png = io.BytesIO()
    fig.savefig(png, format="png", dpi=110)
    plt.close(fig)
    atomic_write_bytes(path, [png.getvalue()])
    return order


#: Files :func:`analyse_priors` writes besides the similarity CSVs and heatmaps.
_PRIOR_FILES = ("nearest_neighbours.txt", "summary.json")


def _prior_outputs(out: Path) -> list[str]:
    """Names of the files in ``out`` an analysis writes or replaces."""
    if not out.is_dir():
        return []
    return sorted(p.name for p in out.iterdir() if p.name in _PRIOR_FILES or (
        p.name.startswith(("task_similarity_", "modality_similarity_"))
        and p.suffix in (".csv", ".png")))


def analyse_priors(model, out_dir: str | os.PathLike, k: int = 3, png: bool = True,
                   modality_reduce: str = "flatten", center: str = "none",
                   png_levels: bool = True, force: bool = False) -> dict:
    """Write the prior analysis of ``model`` to ``out_dir``.

    ``center="groups"`` analyses dataset-centred task priors (see :func:`task_prior_similarity`).

    Files: ``task_similarity_level{1..5}.csv``, ``task_similarity_concat.csv`` and the same for
    ``modality_``; ``*_concat.png`` and (``png_levels``) ``*_level{l}.png`` clustered heatmaps
    (``png=True``);
    ``nearest_neighbours.txt``; ``summary.json``. Every file is written atomically; similarity
    CSVs and heatmaps of an earlier analysis in ``out_dir`` that this one does not rewrite
    (e.g. heatmaps, with ``png=False``) are removed. Returns the summary dict.

    Raises:
        FileExistsError: ``out_dir`` is a file, or holds files of these names (an earlier
            analysis, or the user's) and ``force`` is False.
    """
    if int(k) < 1:
        raise ValueError(f"k (neighbours per name, --top) must be at least 1, got {k}")
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"{out} is a file: the analysis needs a folder")
    present = _prior_outputs(out)
    if present and not force:
        raise FileExistsError(f"{out} already holds {first_of(present, 3)}: choose another "
                              "folder, or force (--force) to replace them")
    out.mkdir(parents=True, exist_ok=True)
    results = {"task": task_prior_similarity(model, center),
               "modality": modality_prior_similarity(model, modality_reduce)}
    files = []
    orders: dict[str, list[str]] = {}
    for kind, res in results.items():
        mats = {f"level{i + 1}": s for i, s in enumerate(res.levels)}
        mats["concat"] = res.concat
        for tag, mat in mats.items():
            stem = f"{kind}_similarity_{tag}"
            write_matrix_csv(out / f"{stem}.csv", res.names, mat)
            files.append(f"{stem}.csv")
            if png and (png_levels or tag == "concat"):
                title = f"{kind} priors, cosine similarity ({tag})"
                order = plot_heatmap(out / f"{stem}.png", res.names, mat, title)
                files.append(f"{stem}.png")
                if tag == "concat":
                    orders[kind] = [res.names[i] for i in order]
    nn_tasks = nearest_neighbours(results["task"], k)
    nn_mods = nearest_neighbours(results["modality"], k)
    lines = ["Nearest neighbours by cosine similarity of the task priors",
             "(level-normalised concatenation over the fusion levels"
             + ("; dataset-centred" if center == "groups" else "") + ")", ""]
    width = max(len(n) for n in nn_tasks) if nn_tasks else 4
    for name, nbrs in nn_tasks.items():
        lines.append(f"{name:<{width}}  " + ", ".join(f"{n} ({s:+.3f})" for n, s in nbrs))
    lines += ["", "Modality priors", ""]
    width = max(len(n) for n in nn_mods) if nn_mods else 4
    for name, nbrs in nn_mods.items():
        lines.append(f"{name:<{width}}  " + ", ".join(f"{n} ({s:+.3f})" for n, s in nbrs))
    atomic_write_bytes(out / "nearest_neighbours.txt", [("\n".join(lines) + "\n").encode()])
    files.append("nearest_neighbours.txt")
    summary = {
        "tasks": results["task"].names,
        "modalities": results["modality"].names,
        "levels": len(results["task"].levels),
        "modality_reduce": modality_reduce,
        "center": center,
        "task_nearest": {n: [[m, s] for m, s in v] for n, v in nn_tasks.items()},
        "modality_nearest": {n: [[m, s] for m, s in v] for n, v in nn_mods.items()},
        "cluster_order": orders,
        "files": files,
    }
    atomic_write_json(out / "summary.json", summary)
    for old in (*out.glob("task_similarity_*"), *out.glob("modality_similarity_*")):
        if old.suffix in (".csv", ".png") and old.name not in files:
            old.unlink()
    return summary
