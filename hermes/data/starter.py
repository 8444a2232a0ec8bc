"""A small *real* starter collection built from packages on PyPI and Debian (``hermes data
starter DIR``).

Only package registries are reachable from many research and CI machines, so the images come
from packages that ship them. At build time the packages are fetched with ``pip download
--no-deps`` / ``apt-get download`` into a temporary folder, the needed files are extracted,
labels are derived as documented below, and an MSD/nnU-Net-layout collection is written with a
``collection.yaml``, ``provenance.json`` and ``PROVENANCE.md`` (source, version, archive sha256,
licence, derivation of every file). Nothing is downloaded when the package is imported.

Datasets (label derivations are the functions of this module, unit-tested on small arrays):

========================  ======  ============================================================
dataset                   mod.    source -> labels
========================  ======  ============================================================
radiomics_chest_ct        CT      pyradiomics 3.0.1 sdist ``data/lung{1,2}`` (LPS NRRD, 5 mm
                                  slices): given lesion mask + body/lungs/bone by HU thresholds
                                  (:func:`derive_chest_ct_labels`)
invesalius_head_ct        CT      Debian ``invesalius-examples`` ``Cranium.inv3``: bone and head
                                  masks stored in the project (:func:`derive_head_ct_labels`)
mni152_t1_brain           T1      nilearn ICBM152 2009a T1 + GM/WM probability maps
                                  (:func:`derive_brain_tissue_labels`)
mni152_t1_head            T1      nimare 0.22.1 MNI152NLin6Asym T1 with skull + brain mask
mni152_t2_SIMULATED       T2      SIMULATED from the ICBM152 tissue labels (:func:`simulate_t2`)
mni152_pet_SIMULATED      PET     SIMULATED FDG-like uptake from the tissue labels
                                  (:func:`simulate_pet`)
========================  ======  ============================================================

There is no real T2 or PET volume in any reachable package: the simulated datasets say so in
their names, their ``dataset.json`` (``"simulated": true``) and the provenance files.
"""

from __future__ import annotations

import io
import json
import os
import plistlib
import shutil
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import yaml
from scipy import ndimage

from hermes.data.io import load_image, save_image, spacing_from_affine
from hermes.files import sha256_file

__all__ = [
    "StarterError",
    "SOURCES",
    "SOURCE_DATASETS",
    "build_starter_collection",
    "derive_brain_tissue_labels",
    "derive_chest_ct_labels",
    "derive_head_ct_labels",
    "read_inv3",
    "simulate_t2",
    "simulate_pet",
]


class StarterError(RuntimeError):
    """Building the starter collection failed (names the source and the command)."""


# --------------------------------------------------------------------------------------------
# label derivations (pure functions on arrays)
# --------------------------------------------------------------------------------------------


def _largest_component(mask: np.ndarray) -> np.ndarray:
    lab, n = ndimage.label(mask)
    if n == 0:
        return mask.copy()
    sizes = ndimage.sum_labels(mask, lab, index=np.arange(1, n + 1))
    return lab == (1 + int(np.argmax(sizes)))


def _fill_holes_per_slice(mask: np.ndarray, axis: int = 2) -> np.ndarray:
    out = np.empty_like(mask)
    for k in range(mask.shape[axis]):
        sl = [slice(None)] * 3
        sl[axis] = k
        out[tuple(sl)] = ndimage.binary_fill_holes(mask[tuple(sl)])
    return out


def derive_brain_tissue_labels(
    t1: np.ndarray, gm: np.ndarray, wm: np.ndarray, threshold: float = 0.5
) -> np.ndarray:
    """Tissue label map from a skull-stripped T1 and GM/WM probability maps (same grid).

    Brain = T1 > 0; inside it 1 = grey matter (GM >= WM and GM > ``threshold``), 2 = white
    matter (WM > GM and WM > ``threshold``), 3 = rest of the brain (CSF and other); 0 outside.
    Probabilities may be in [0, 1] or [0, 255] (rescaled).

    Returns:
        uint8 ``(X, Y, Z)``.
    """
    gm = np.asarray(gm, np.float32)
    wm = np.asarray(wm, np.float32)
    if max(float(gm.max()), float(wm.max())) > 1.5:
        gm, wm = gm / 255.0, wm / 255.0
    brain = np.asarray(t1) > 0
    lab = np.zeros(t1.shape, np.uint8)
    lab[brain] = 3
    lab[brain & (gm >= wm) & (gm > threshold)] = 1
    lab[brain & (wm > gm) & (wm > threshold)] = 2
    return lab


def derive_chest_ct_labels(
    hu: np.ndarray, lesion: np.ndarray | None = None, body_hu: float = -500.0,
    lung_hu: float = -400.0, bone_hu: float = 250.0, min_lung_fraction: float = 0.05,
) -> np.ndarray:
    """Chest CT label map from Hounsfield units (axial slices along the last axis).

    - body: largest connected component of ``HU > body_hu`` with holes filled slice by slice
      (so the lungs are inside it);
    - lungs: ``HU < lung_hu`` inside the body, connected components holding at least
      ``min_lung_fraction`` of the largest one (keeps both lungs, drops small air pockets);
      the airways connected to the lungs are included;
    - bone: ``HU > bone_hu`` inside the body, outside the lungs;
    - lesion: the given mask (painted last).

    Returns:
        uint8: 1 other body tissue, 2 lung, 3 bone, 4 lesion (tasks: body = 1-4, lungs = 2, 4).
    """
    hu = np.asarray(hu)
    body = _fill_holes_per_slice(_largest_component(hu > body_hu))
    air = body & (hu < lung_hu)
    comp, n = ndimage.label(air)
    lungs = np.zeros_like(air)
    if n:
        sizes = ndimage.sum_labels(air, comp, index=np.arange(1, n + 1))
        keep = np.flatnonzero(sizes >= min_lung_fraction * sizes.max()) + 1
        lungs = np.isin(comp, keep)
    lab = np.zeros(hu.shape, np.uint8)
    lab[body] = 1
    lab[lungs] = 2
    lab[body & ~lungs & (hu > bone_hu)] = 3
    if lesion is not None:
        lab[np.asarray(lesion) > 0] = 4
    return lab


def derive_head_ct_labels(head_mask: np.ndarray, bone_mask: np.ndarray) -> np.ndarray:
    """Head CT label map from InVesalius' threshold masks: 1 head soft tissue, 2 bone
    (tasks: head = 1, 2; bone = 2).

    The head is the largest connected component of the head mask, which drops the head
    holder, the table and noise. Bone is the bone mask inside that head.
    """
    head = _largest_component(np.asarray(head_mask) > 0)
    lab = np.zeros(head.shape, np.uint8)
    lab[head] = 1
    lab[head & (np.asarray(bone_mask) > 0)] = 2
    return lab


def read_inv3(path: str | os.PathLike) -> tuple[np.ndarray, np.ndarray, dict[str, np.ndarray]]:
    """Read an InVesalius 3 project (``.inv3``: a tar of plists and raw arrays).

    The volume is ``matrix.dat`` (z, y, x) with the dtype/shape of ``main.plist``; masks are
    ``(z+1, y+1, x+1)`` uint8 whose first index along each axis is bookkeeping (dropped) and
    whose voxels are 255 inside. No direction cosines are stored. InVesalius keeps slices in
    VTK order (rows flipped with respect to DICOM), so: columns -> patient left (DICOM
    convention, assumed: left/right cannot be checked on a symmetric head), rows -> anterior
    (checked on Cranium.inv3: the face and sinuses lie at high row indices, the head holder at
    low ones), slices -> superior (checked: the skull section shrinks towards the vertex).

    Returns:
        ``(volume (X, Y, Z), ras_affine, {mask name: bool (X, Y, Z)})``.
    """
    with tarfile.open(path) as tar:
        members = {Path(m.name).name: m for m in tar.getmembers() if m.isfile()}

        def read(name: str) -> bytes:
            if name not in members:
                raise StarterError(f"{path}: {name} missing from the InVesalius project")
            f = tar.extractfile(members[name])
            assert f is not None
            return f.read()

        main = plistlib.loads(read("main.plist"))
        mat = main["matrix"]
        shape = tuple(int(s) for s in mat["shape"])
        vol = np.frombuffer(read(mat["filename"]), dtype=np.dtype(mat["dtype"]).newbyteorder("<"))
        vol = vol.reshape(shape)
        masks = {}
        for _, mplist in sorted(main.get("masks", {}).items()):
            mp = plistlib.loads(read(mplist))
            mshape = tuple(int(s) for s in mp["mask_shape"])
            m = np.frombuffer(read(mp["mask_file"]), np.uint8).reshape(mshape)[1:, 1:, 1:]
            masks[str(mp.get("name", mplist))] = {
                "mask": np.ascontiguousarray(np.transpose(m > 127, (2, 1, 0))),
                "threshold_range": list(mp.get("threshold_range", [])),
            }
    sx, sy, sz = (float(s) for s in main["spacing"])
    affine = np.diag([-sx, sy, sz, 1.0])  # x: cols -> L, y: rows -> A, z: slices -> S
    data = np.ascontiguousarray(np.transpose(vol, (2, 1, 0)))
    return data, affine, masks  # type: ignore[return-value]


def simulate_t2(tissue: np.ndarray, seed: int = 0, affine: np.ndarray | None = None) -> np.ndarray:
    """SIMULATED T2-weighted contrast from a tissue label map (0 bg, 1 GM, 2 WM, 3 CSF/other).

    T2 ordering CSF > GM > WM (the reverse of T1 for CSF/WM), partial-volume blur, a smooth
    multiplicative bias field and Rician noise. Not a physical simulation.

    Returns:
        float32 ``(X, Y, Z)``, 0 outside the brain before noise.
    """
    rng = np.random.default_rng(seed)
    table = np.array([0.0, 620.0, 430.0, 1500.0], np.float32)
    img = table[np.asarray(tissue, np.int64)]
    sp = spacing_from_affine(affine) if affine is not None else (1.0, 1.0, 1.0)
    img = ndimage.gaussian_filter(img, [0.8 / s for s in sp])
    grid = np.meshgrid(*[np.linspace(-1, 1, n, dtype=np.float32) for n in img.shape],
                       indexing="ij", sparse=True)
    c = rng.normal(0, 0.12, 4)
    img = img * np.exp(c[0] * grid[0] + c[1] * grid[1] + c[2] * grid[2] + c[3] * grid[2] ** 2)
    sd = 0.02 * float(img.max())
    noisy = np.hypot(img + rng.normal(0, sd, img.shape), rng.normal(0, sd, img.shape))
    return noisy.astype(np.float32)


def simulate_pet(tissue: np.ndarray, affine: np.ndarray, seed: int = 0,
                 fwhm_mm: float = 6.0) -> np.ndarray:
    """SIMULATED FDG-PET-like uptake (SUV-like) from a tissue label map (0 bg, 1 GM, 2 WM,
    3 CSF/other): GM 8, WM 3, CSF 0.5, background 0.2; blurred with a Gaussian of
    ``fwhm_mm`` and multiplicative noise. Not a physical simulation.

    Returns:
        float32 ``(X, Y, Z)`` >= 0.
    """
    rng = np.random.default_rng(seed)
    table = np.array([0.2, 8.0, 3.0, 0.5], np.float32)
    img = table[np.asarray(tissue, np.int64)]
    sigma = [fwhm_mm / 2.355 / s for s in spacing_from_affine(affine)]
    img = ndimage.gaussian_filter(img, sigma)
    img = img * (1.0 + rng.normal(0, 0.06, img.shape).astype(np.float32))
    return np.maximum(img, 0).astype(np.float32)


# --------------------------------------------------------------------------------------------
# downloads
# --------------------------------------------------------------------------------------------


def _run(cmd: Sequence[str], cwd: Path, what: str) -> None:
    try:
        r = subprocess.run(list(cmd), cwd=cwd, capture_output=True, text=True, timeout=900)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise StarterError(f"{what}: `{' '.join(cmd)}` failed: {exc}") from exc
    if r.returncode != 0:
        tail = (r.stderr or r.stdout).strip().splitlines()[-5:]
        raise StarterError(f"{what}: `{' '.join(cmd)}` exited {r.returncode}: "
                           + " | ".join(tail))


def pip_download(requirement: str, dest: Path, sdist: bool = False) -> Path:
    """``pip download --no-deps REQUIREMENT`` into ``dest``; returns the archive."""
    dest.mkdir(parents=True, exist_ok=True)
    before = set(dest.iterdir())
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "-q", "-d", str(dest)]
    if sdist:
        cmd += ["--no-binary", ":all:", "--no-build-isolation"]
    _run(cmd + [requirement], dest, requirement)
    new = sorted(set(dest.iterdir()) - before) or sorted(
        p for p in dest.iterdir()
        if p.name.lower().startswith(requirement.split("==")[0].replace("-", "_").lower())
        or p.name.lower().startswith(requirement.split("==")[0].lower()))
    if not new:
        raise StarterError(f"{requirement}: pip download produced no file in {dest}")
    return new[0]


def _extract_deb(deb: Path, dest: Path) -> None:
    """Unpack a .deb's data archive (uses dpkg-deb when present, else reads the ar format)."""
    dest.mkdir(parents=True, exist_ok=True)
    if shutil.which("dpkg-deb"):
        _run(["dpkg-deb", "-x", str(deb), str(dest)], dest, deb.name)
        return
    data = deb.read_bytes()
    if not data.startswith(b"!<arch>\n"):
        raise StarterError(f"{deb}: not a Debian package")
    pos = 8
    while pos < len(data):
        name = data[pos:pos + 16].decode().strip().rstrip("/")
        size = int(data[pos + 48:pos + 58].decode().strip())
        body = data[pos + 60:pos + 60 + size]
        if name.startswith("data.tar"):
            with tarfile.open(fileobj=io.BytesIO(body)) as tar:
                tar.extractall(dest, filter="data")
            return
        pos += 60 + size + (size % 2)
    raise StarterError(f"{deb}: no data.tar member")


def apt_download(package: str, dest: Path) -> Path:
    """``apt-get download PACKAGE`` into ``dest``; returns the .deb."""
    dest.mkdir(parents=True, exist_ok=True)
    if not shutil.which("apt-get"):
        raise StarterError(f"{package}: apt-get not available on this machine")
    _run(["apt-get", "download", package], dest, package)
    debs = sorted(dest.glob(f"{package}_*.deb"))
    if not debs:
        raise StarterError(f"{package}: apt-get download produced no .deb")
    return debs[-1]


# --------------------------------------------------------------------------------------------
# dataset writers
# --------------------------------------------------------------------------------------------


@dataclass
class _Dataset:
    name: str
    modality: str
    labels: dict[str, list[int]]
    shared: list[str]
    cases: list[tuple[str, np.ndarray, np.ndarray, np.ndarray]] = field(default_factory=list)
    file_ending: str = ".nii.gz"
    simulated: bool = False
    provenance: dict = field(default_factory=dict)


def _write(ds: _Dataset, out: Path) -> None:
    root = out / ds.name
    for cid, img, lab, aff in ds.cases:
        save_image(root / "imagesTr" / f"{cid}_0000{ds.file_ending}", img, aff)
        save_image(root / "labelsTr" / f"{cid}{ds.file_ending}", lab, aff)
    meta = {
        "name": ds.name,
        "channel_names": {"0": ds.modality},
        "labels": {"background": 0, **ds.labels},
        "numTraining": len(ds.cases),
        "file_ending": ds.file_ending,
        "simulated": ds.simulated,
        "hermes_provenance": ds.provenance,
    }
    if ds.simulated:
        meta["description"] = "SIMULATED images (not real acquisitions of this modality)"
    (root / "dataset.json").write_text(json.dumps(meta, indent=2))


def _unzip(archive: Path, members: Sequence[str], dest: Path) -> dict[str, Path]:
    out = {}
    with zipfile.ZipFile(archive) as z:
        for m in members:
            z.extract(m, dest)
            out[m] = dest / m
    return out


def _src_pyradiomics(dl: Path, work: Path) -> list[_Dataset]:
    try:
        archive = pip_download("pyradiomics==3.0.1", dl, sdist=True)
    except StarterError as exc:
        raise StarterError(f"{exc} (the sdist needs numpy, versioneer, setuptools and wheel "
                           "installed: pip install numpy versioneer setuptools wheel)") from exc
    with tarfile.open(archive) as tar:
        names = [m for m in tar.getmembers()
                 if "/data/" in m.name and m.name.endswith(".nrrd")
                 and Path(m.name).name.startswith("lung")]
        tar.extractall(work, members=names, filter="data")
    files = {Path(m.name).name: work / m.name for m in names}
    ds = _Dataset("radiomics_chest_ct", "CT",
                  {"body": [1, 2, 3, 4], "lungs": [2, 4], "bone": [3], "lung_lesion": [4]},
                  shared=["body", "lungs", "bone"], file_ending=".nrrd")
    for case in ("lung1", "lung2"):
        img, aff = load_image(files[f"{case}_image.nrrd"])
        les, _ = load_image(files[f"{case}_label.nrrd"])
        lab = derive_chest_ct_labels(img, les)
        ds.cases.append((case, img, lab, aff))
    ds.provenance = {
        "source": "pyradiomics 3.0.1 source distribution (PyPI), data/lung{1,2}_{image,label}"
                  ".nrrd",
        "command": "pip download --no-deps --no-binary :all: --no-build-isolation "
                   "pyradiomics==3.0.1",
        "archive": archive.name, "sha256": sha256_file(archive),
        "licence": "BSD-3-Clause (pyradiomics); the package does not document the origin of "
                   "its test images",
        "labels": "lung_lesion: the mask shipped with the image; body, lungs, bone derived by "
                  "HU thresholds (hermes.data.starter.derive_chest_ct_labels: body HU>-500 "
                  "largest component, holes filled per slice; lungs HU<-400 inside body; "
                  "bone HU>250)",
        "simulated": False,
    }
    return [ds]


def _src_invesalius(dl: Path, work: Path) -> list[_Dataset]:
    deb = apt_download("invesalius-examples", dl)
    _extract_deb(deb, work / "deb")
    inv = next((work / "deb").rglob("Cranium.inv3"), None)
    if inv is None:
        raise StarterError(f"{deb.name}: Cranium.inv3 not found")
    vol, aff, masks = read_inv3(inv)
    by_thr = sorted(masks.values(), key=lambda m: m["threshold_range"][0])
    head, bone = by_thr[0], by_thr[-1]  # lower threshold: head; higher: bone
    lab = derive_head_ct_labels(head["mask"], bone["mask"])
    ds = _Dataset("invesalius_head_ct", "CT", {"head": [1, 2], "bone": [2]}, shared=["bone"])
    ds.cases.append(("cranium", vol.astype(np.int16), lab, aff))
    ds.provenance = {
        "source": "Debian package invesalius-examples, "
                  "usr/share/doc/invesalius-examples/examples/Cranium.inv3 ('ProMED CT 0051')",
        "command": "apt-get download invesalius-examples",
        "archive": deb.name, "sha256": sha256_file(deb),
        "licence": "GPL-2 (Debian copyright file of invesalius-examples)",
        "labels": f"head: largest connected component of the InVesalius mask thresholded at "
                  f"{head['threshold_range']} HU; bone: the mask thresholded at "
                  f"{bone['threshold_range']} HU (both stored in the project), inside the "
                  "head (hermes.data.starter.derive_head_ct_labels). Orientation not stored: "
                  "rows -> anterior and slices -> superior checked on the image, columns -> "
                  "left assumed (DICOM convention).",
        "simulated": False,
    }
    return [ds]


_NILEARN = "nilearn/datasets/data/mni_icbm152_{}_tal_nlin_sym_09a_converted.nii.gz"


def _src_nilearn(dl: Path, work: Path, simulated: bool) -> list[_Dataset]:
    archive = pip_download("nilearn", dl)
    files = _unzip(archive, [_NILEARN.format(k) for k in ("t1", "gm", "wm")], work)
    t1, aff = load_image(files[_NILEARN.format("t1")], dtype=np.float32)
    gm, _ = load_image(files[_NILEARN.format("gm")], dtype=np.float32)
    wm, _ = load_image(files[_NILEARN.format("wm")], dtype=np.float32)
    tissue = derive_brain_tissue_labels(t1, gm, wm)
    labels = {"brain": [1, 2, 3], "grey_matter": [1], "white_matter": [2]}
    shared = ["brain", "grey_matter", "white_matter"]
    base = {
        "source": f"nilearn wheel ({archive.name}), "
                  "nilearn/datasets/data/mni_icbm152_{t1,gm,wm}_tal_nlin_sym_09a_converted"
                  ".nii.gz: ICBM 2009a nonlinear symmetric template (McConnell Brain Imaging "
                  "Centre, MNI)",
        "command": "pip download --no-deps nilearn",
        "archive": archive.name, "sha256": sha256_file(archive),
        "licence": "nilearn: BSD-3-Clause; ICBM 2009a template: copyright McConnell Brain "
                   "Imaging Centre (MNI, McGill University), free use with attribution "
                   "(keep the copyright notice)",
        "labels": "brain = T1 > 0; grey_matter where GM >= WM and GM > 0.5; white_matter where "
                  "WM > GM and WM > 0.5; other brain voxels (CSF/other) belong to brain only "
                  "(hermes.data.starter.derive_brain_tissue_labels)",
    }
    real = _Dataset("mni152_t1_brain", "T1", labels, shared)
    real.cases.append(("icbm152_2009a", t1.astype(np.float32), tissue, aff))
    real.provenance = {**base, "simulated": False}
    out = [real]
    if simulated:
        t2 = _Dataset("mni152_t2_SIMULATED", "T2", labels, shared, simulated=True)
        t2.cases.append(("icbm152_2009a_simT2", simulate_t2(tissue, 0, aff), tissue, aff))
        t2.provenance = {**base, "simulated": True,
                         "simulation": "T2-like contrast from the tissue labels "
                                       "(hermes.data.starter.simulate_t2): SIMULATED, not a T2 "
                                       "acquisition"}
        pet = _Dataset("mni152_pet_SIMULATED", "PET", labels, shared, simulated=True)
        pet.cases.append(("icbm152_2009a_simPET", simulate_pet(tissue, aff, 0), tissue, aff))
        pet.provenance = {**base, "simulated": True,
                          "simulation": "FDG-like uptake from the tissue labels, 6 mm FWHM "
                                        "blur (hermes.data.starter.simulate_pet): SIMULATED, "
                                        "not a PET acquisition"}
        out += [t2, pet]
    return out


_NIMARE = "nimare/resources/templates/tpl-MNI152NLin6Asym_res-01_{}.nii.gz"


def _src_nimare(dl: Path, work: Path) -> list[_Dataset]:
    archive = pip_download("nimare==0.22.1", dl)
    files = _unzip(archive, [_NIMARE.format("T1w"), _NIMARE.format("desc-brain_mask")], work)
    t1, aff = load_image(files[_NIMARE.format("T1w")])
    mask, _ = load_image(files[_NIMARE.format("desc-brain_mask")])
    ds = _Dataset("mni152_t1_head", "T1", {"brain": [1]}, shared=["brain"])
    ds.cases.append(("mni152nlin6asym", t1, (mask > 0).astype(np.uint8), aff))
    ds.provenance = {
        "source": "nimare 0.22.1 wheel, nimare/resources/templates/"
                  "tpl-MNI152NLin6Asym_res-01_{T1w,desc-brain_mask}.nii.gz (MNI152 6th "
                  "generation nonlinear asymmetric template, as distributed by TemplateFlow)",
        "command": "pip download --no-deps nimare==0.22.1",
        "archive": archive.name, "sha256": sha256_file(archive),
        "licence": "nimare: MIT; the template keeps its upstream (FSL/TemplateFlow) terms: "
                   "check them before commercial use",
        "labels": "brain: the brain mask shipped with the template",
        "simulated": False,
    }
    return [ds]


SOURCES: dict[str, Callable[..., list[_Dataset]]] = {
    "pyradiomics": _src_pyradiomics,
    "invesalius": _src_invesalius,
    "nilearn": _src_nilearn,
    "nimare": _src_nimare,
}
#: the dataset folders each source writes (with ``simulated``: the nilearn source's last two)
SOURCE_DATASETS: dict[str, list[str]] = {
    "pyradiomics": ["radiomics_chest_ct"],
    "invesalius": ["invesalius_head_ct"],
    "nilearn": ["mni152_t1_brain", "mni152_t2_SIMULATED", "mni152_pet_SIMULATED"],
    "nimare": ["mni152_t1_head"],
}


def _provenance_md(datasets: list[_Dataset], failures: dict[str, str]) -> str:
    lines = [
        "# Hermes starter collection: provenance and licences",
        "",
        "Built by `hermes data starter` from packages fetched with pip/apt at build time.",
        "Datasets whose name ends in `_SIMULATED` contain **simulated** images (no T2 or PET",
        "volume is available from the package registries); their labels are real-derived.",
        "These few subjects demonstrate and test the pipeline; they are not for clinical use.",
        "",
    ]
    for ds in datasets:
        p = ds.provenance
        lines += [f"## {ds.name} ({ds.modality}{', SIMULATED' if ds.simulated else ''})", ""]
        for key in ("source", "command", "archive", "sha256", "licence", "labels", "simulation"):
            if key in p:
                lines.append(f"- **{key}**: {p[key]}")
        lines.append(f"- **cases**: {', '.join(c[0] for c in ds.cases)}")
        lines.append("")
    if failures:
        lines += ["## Sources that could not be fetched", ""]
        lines += [f"- {k}: {v}" for k, v in failures.items()]
    return "\n".join(lines) + "\n"


def build_starter_collection(
    out_dir: str | os.PathLike,
    simulated: bool = True,
    keep_downloads: bool = False,
    sources: Sequence[str] | None = None,
) -> Path:
    """Fetch the sources, derive labels and write the starter collection.

    Args:
        out_dir: destination folder (created); gets one folder per dataset,
            ``collection.yaml``, ``provenance.json`` and ``PROVENANCE.md``.
        simulated: also write the SIMULATED T2 and PET datasets.
        keep_downloads: keep the fetched archives in ``out_dir/downloads``.
        sources: subset of :data:`SOURCES` (default: all).

    Returns:
        Path of ``collection.yaml``.

    Raises:
        StarterError: every source failed (each failure is listed); if only some fail, the
            others are written and the failures are recorded in ``PROVENANCE.md``.
    """
    out = Path(out_dir)
    names = list(sources) if sources else list(SOURCES)
    unknown = [n for n in names if n not in SOURCES]
    if unknown:
        raise StarterError(f"unknown source(s) {unknown}; choose from {', '.join(SOURCES)}")
    out.mkdir(parents=True, exist_ok=True)
    datasets: list[_Dataset] = []
    failures: dict[str, str] = {}
    with tempfile.TemporaryDirectory(prefix="hermes-starter-") as tmp:
        dl = Path(tmp) / "downloads"
        for name in names:
            work = Path(tmp) / name
            work.mkdir()
            try:
                fn = SOURCES[name]
                got = fn(dl, work, simulated) if name == "nilearn" else fn(dl, work)
            except (StarterError, OSError, KeyError, ValueError, tarfile.TarError,
                    zipfile.BadZipFile) as exc:
                failures[name] = str(exc)
                continue
            for ds in got:
                assert ds.name in SOURCE_DATASETS[name], ds.name  # the folders checked first
                _write(ds, out)
                datasets.append(ds)
            shutil.rmtree(work, ignore_errors=True)
        if keep_downloads and dl.exists():
            shutil.copytree(dl, out / "downloads", dirs_exist_ok=True)
    if not datasets:
        raise StarterError("no source could be fetched:\n  "
                           + "\n  ".join(f"{k}: {v}" for k, v in failures.items()))
    shared = sorted({s for ds in datasets for s in ds.shared})
    cfg = {
        "name": "hermes_starter",
        "description": "Small real collection from PyPI/Debian packages; datasets ending in "
                       "_SIMULATED hold simulated images. See PROVENANCE.md.",
        "shared_tasks": shared,
        "datasets": [
            {"name": ds.name, "path": ds.name, "modality": ds.modality,
             "weight": 0.5 if ds.simulated else 1.0}
            for ds in datasets
        ],
    }
    path = out / "collection.yaml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    prov = {ds.name: {**ds.provenance, "modality": ds.modality,
                      "cases": [c[0] for c in ds.cases]} for ds in datasets}
    (out / "provenance.json").write_text(json.dumps({"datasets": prov, "failed": failures},
                                                    indent=2))
    (out / "PROVENANCE.md").write_text(_provenance_md(datasets, failures))
    return path
