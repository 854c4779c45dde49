# ---
# jupyter:
#   jupytext:
#     formats: ipynb,py:percent
#     text_representation:
#       extension: .py
#       format_name: percent
#       format_version: '1.3'
#       jupytext_version: 1.19.6
#   kernelspec:
#     display_name: Python 3 (ipykernel)
#     language: python
#     name: python3
# ---

# %% [markdown] tags=["remove-cell"]
# [![Open in Colab](https://colab.research.google.com/assets/colab-badge.svg)](https://colab.research.google.com/github/qmri-tutorials/qmri-tutorials/blob/main/notebooks/01_t1_inversion_recovery.ipynb)
# [![Launch Binder](https://mybinder.org/badge_logo.svg)](https://mybinder.org/v2/gh/qmri-tutorials/qmri-tutorials/main?urlpath=lab/tree/notebooks/01_t1_inversion_recovery.ipynb)

# %% tags=["remove-cell"]
# On Colab, or in any Python without qmri_helpers, this installs it from the repository
# (about a minute; Colab's own torch is kept). Binder and `make setup` have it already, and
# then this cell does nothing.
import importlib.util
import subprocess
import sys

QMRI_TUTORIALS = "qmri-tutorials @ git+https://github.com/qmri-tutorials/qmri-tutorials@main"
if importlib.util.find_spec("qmri_helpers") is None:
    subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", QMRI_TUTORIALS], check=True)
    importlib.invalidate_caches()  # so that this kernel finds it without a restart

# %% [markdown]
# # T1 mapping from inversion-recovery DICOMs
#
# ## Overview
# An inversion-recovery (IR) experiment inverts the longitudinal magnetisation and images it
# after a set of inversion times (TI). How fast the signal recovers tells us T1, voxel by
# voxel. In this tutorial we go from a Zenodo record to a T1 map in six steps:
#
# 1. **download** the ISMRM 2024 QMRI challenge data into a cache, verified and unzipped;
# 2. **load** one DICOM file per TI into a tensor, sorted by the DICOM tags;
# 3. **define the model** $|q(TI)| = |M_0 (1 - 2 e^{-TI/T_1})|$ and a mean-squared-error loss;
# 4. **initialise** every voxel by dictionary matching;
# 5. **fit** all voxels at once with Adam;
# 6. **visualise** the images, the start values, the maps and their error.
#
# ## Prerequisites
# | Concept | Importance | Notes |
# |---|---|---|
# | Python and NumPy | necessary | arrays, shapes, broadcasting |
# | [PyTorch tensors and autograd](https://pytorch.org/tutorials/beginner/basics/intro.html) | helpful | we only use tensors and one optimiser |
# | T1 relaxation and the inversion-recovery sequence | helpful | the model is explained below |
#
# **Learning goals:** read a DICOM series safely, write a signal model as code, know why a good
# start value matters, and judge a T1 map against a ground truth.
#
# **Estimated time:** 20 minutes to read; the notebook runs in under a minute on a laptop CPU.

# %%
import torch

import qmri_helpers as qh
from qmri_helpers.plotting import MapSpec

torch.manual_seed(0)
DEVICE = qh.fitting.default_device()  # the GPU when there is one
print(f"qmri_helpers {qh.__version__}, torch {torch.__version__}, fitting on: {DEVICE}")

# %% [markdown]
# ## 1. Download the data
# The challenge data are Zenodo record [10868350](https://doi.org/10.5281/zenodo.10868350),
# file `T1 IR.zip`. `fetch` downloads it once with `zenodo_get` into a per-user cache
# (`$QMRI_DATA_DIR` moves it), checks its md5, and unzips it; a second run uses the cache.
#
# Without a network the notebook falls back to an **embedded synthetic phantom**: 14 vials
# with the T1 values of the NIST system phantom, written as real DICOM files, with known
# ground truth. Set `QMRI_DATA=sample` to choose the phantom, or `QMRI_DATA=zenodo` to insist
# on the download. The line printed below says which data this run used.

# %%
data = qh.data.load_tutorial_data("t1_ir")
print(f"Data used: {data.source}\n{data.description}")

# %% [markdown]
# ## 2. Load the DICOM series
# Each file holds one image at one TI. File names carry no order (the phantom's are even
# shuffled on purpose), so `load_series` sorts by the `InversionTime` tag and converts the
# stored integers to physical values with `RescaleSlope`/`RescaleIntercept`. It returns a tensor
# of shape `(n_TI, z, y, x)` and a header with TI, TE and TR in **seconds**.

# %%
images, header = qh.dicom.load_series(data.folder)
print(f"images: {tuple(images.shape)} (TI, z, y, x)")
print(f"TI (s): {[round(t, 4) for t in header.ti.tolist()]}")
print(f"TE (s): {header.te[0]:.4f}, TR (s): {header.tr.unique().tolist()}")
print(f"first files: {[f[0].name for f in header.files[:3]]}")

# %%
fig = qh.plotting.show_series(
    images, header.ti, label="TI", title=f"Inversion-recovery images ({data.source})"
)
# %% [markdown]
# Early TIs are dark where the magnetisation passes through zero: the image shows the
# *magnitude*, so the recovery curve folds up at the null point $TI = T_1 \ln 2$.
#
# ## 3. The signal model and the loss
# After a perfect inversion and full recovery between repetitions ($TR \gg T_1$) the
# longitudinal magnetisation at time $TI$ is $M_0 (1 - 2 e^{-TI/T_1})$, and a magnitude image
# sees its absolute value:
#
# $$|q(TI)| = \left| M_0 \left(1 - 2 e^{-TI/T_1}\right) \right|.$$
#
# `qh.models.inversion_recovery(ti)` returns this model as a function of the parameter maps;
# `qh.models.mse` compares a prediction with the data. Both are plain torch code, so autograd
# gives us gradients for free.

# %%
model = qh.models.inversion_recovery(header.ti)
loss = qh.models.mse

# One voxel with M0 = 1000 and T1 = 0.8 s, at every TI:
print(model(m0=torch.tensor(1000.0), t1=torch.tensor(0.8)))

# %% [markdown]
# ### Exercise 1
# The magnitude curve folds up where the signal crosses zero, the *null point*. At which TI
# is the signal of a vial with $T_1$ = 0.8 s zero? Compute it from the model and store it,
# in seconds, as `ti_null`; the cell after the solution checks it.

# %%
# Write your code here.

# %% [markdown]
# ### Solution for Exercise 1
# Expand the cell below to see one solution.

# %% tags=["solution", "hide-input"] jupyter={"source_hidden": true}
import math

ti_null = 0.8 * math.log(2)  # 1 - 2 exp(-TI/T1) = 0  <=>  exp(-TI/T1) = 1/2

# %%
qh.exercises.check_null_point(ti_null, t1=0.8)

# %% [markdown]
# ## 4. Start values by dictionary matching
# Gradient descent needs a start close to the answer. We simulate the curve for a grid of
# T1 values (the *dictionary*), normalise every curve and every voxel to unit length, and give
# each voxel the T1 whose curve has the largest dot product with its own. M0 then follows from
# the maximum magnitude. The grid is log-spaced, because the T1 values span two decades.

# %%
t1_grid = torch.logspace(-2, 1, 300)  # 10 ms to 10 s
start = qh.fitting.dictionary_match(images, model, "t1", t1_grid)
mask = qh.fitting.signal_mask(images)
print(f"start loss: {loss(model(**start), images):.4g}")

fig = qh.plotting.show_maps(
    [
        MapSpec(start["m0"], "Start M0", "M0 (a.u.)"),
        MapSpec(start["t1"], "Start T1 (dictionary)", "T1 (ms)", 0, 2500, scale=1000),
    ],
    mask=mask,
    title="Start values from dictionary matching",
)
# %% [markdown]
# ## 5. Fit every voxel at once with Adam
# All voxels are fitted together: the loss is the sum of the per-voxel errors, so each voxel's
# gradient only depends on its own parameters. Adam works on $\log M_0$ and $\log T_1$, so a
# step changes a short and a long T1 by the same *relative* amount. It runs on the GPU when
# there is one. A voxel the fit cannot answer for (NaN or inf in its data, no signal at all,
# a non-finite result) is not given a value: it fails, is masked, and `result.summary()` counts
# it by reason.

# %%
N_ITER = 2000
result = qh.fitting.fit_adam(model, images, start, n_iter=N_ITER, lr=0.01, device=DEVICE)
print(f"final loss {result.loss_history[-1]:.4g}")
print(result.summary())
fig = qh.plotting.show_loss(result.loss_history)
# %% [markdown]
# ## 6. The maps

# %%
m0_map, t1_map = result.params["m0"], result.params["t1"]
fig = qh.plotting.show_maps(
    [
        MapSpec(m0_map, "M0", "M0 (a.u.)"),
        MapSpec(t1_map, "T1", "T1 (ms)", 0, 2500, scale=1000),
    ],
    mask=mask & result.valid,
    title=f"Fitted maps ({data.source}, {N_ITER} Adam iterations)",
)
# %% [markdown]
# ### How good is the map?
# On the phantom we know the truth, so the relative error $(\hat T_1 - T_1)/T_1$ is a map of
# its own. On the challenge data there is no truth; we show the relative residual instead,
# $\|\text{data} - \text{model}\| / \|\text{data}\|$ per voxel, which exposes voxels
# the model does not describe.

# %%
if data.truth is not None:
    error = qh.metrics.relative_error(t1_map, data.truth.t1)
    panel = MapSpec(error, "Relative error of T1", "relative error (%)", -5, 5, "RdBu_r", 100)
    shown = torch.as_tensor(data.truth.labels > 0)
else:
    residual = result.residual_norm / images.norm(dim=0).clamp_min(1e-12)
    panel = MapSpec(residual, "Relative residual", "‖residual‖ / ‖data‖ (%)", 0, 10, "magma", 100)
    shown = mask
fig = qh.plotting.show_maps([panel], mask=shown, title=f"Error map ({data.source})")
# %% [markdown]
# On the phantom we can check the map vial by vial: the table gives the true T1, the median
# fitted T1 and the median relative error of the voxels in each vial.

# %%
if data.truth is not None:
    rows = qh.metrics.vial_table(t1_map, data.truth)
    print(" vial  true T1 (ms)  median fit (ms)  median |rel. error| (%)")
    for row in rows:
        print(
            f"{row['vial']:5d}  {row['true'] * 1000:12.1f}  {row['median'] * 1000:15.1f}"
            f"  {row['median_abs_rel_error'] * 100:23.2f}"
        )
    in_range = data.truth.vial_mask((0.1, 2.5))
    errors = qh.metrics.relative_error(t1_map, data.truth.t1)[torch.as_tensor(in_range)]
    median_error = errors.abs().median().item()
    print(f"\nMedian |relative error| in vials with T1 0.1-2.5 s: {median_error:.2%}")
    assert median_error < 0.02, "the T1 map is off: check the fit settings"
    shortest_ti = header.ti.min().item()
    short = [row for row in rows if row["true"] < shortest_ti]
    worst_short = max(row["median_abs_rel_error"] for row in short)
    print(
        f"Vials with T1 below the shortest TI ({shortest_ti * 1000:.0f} ms): {len(short)}, "
        f"median |relative error| at most {worst_short:.2%}"
    )
    assert worst_short < 0.03, "the text below says these vials are within 3%"
else:
    print("Challenge data: no ground truth; see the residual map above.")

# %% [markdown]
# On the phantom even the vials whose T1 is shorter than the shortest TI are within 3%
# (the last line above): the first TIs still catch the end of their recovery, and with
# SNR 100 that is enough to fix T1. Their error grows as T1 shortens, because less of the
# recovery is left to see. On a real scan, with more noise and an imperfect inversion,
# notebook 04 flags such spheres as unreliable instead of judging them.

# %% [markdown]
# ## Optional: explore voxel by voxel
# In JupyterLab these are live widgets: slide to a voxel to see its measured curve, the fit, the
# dictionary start, and T1 with its Cramér-Rao SD; or step through the TI images. Rendered
# without a widget frontend (an HTML report, GitHub) each shows a static figure instead.

# %%
qh.widgets.voxel_inspector(images, header.ti, result, qh.models.inversion_recovery, start)

# %%
qh.widgets.image_slider(images, header.ti, label="TI")

# %% [markdown]
# ## Summary
# - `fetch` gives the challenge data from a verified cache, or the notebook falls back to a
#   synthetic phantom and says so.
# - DICOMs are sorted by `InversionTime`, never by file name, and rescaled to physical values.
# - The model is a few lines of torch; dictionary matching gives every voxel a good start, and
#   Adam refines all voxels at once.
# - On the phantom the fitted T1 is within a fraction of a percent of the truth for
#   T1 between 0.1 and 2.5 s.
#
# ## What's next?
# - **02_t2star_multi_echo**: map T2* from multi-echo gradient-echo data with the same tools.
# - Try it: change `N_ITER` to 200, or the grid to 20 values, and watch the error map.
# - Real scanners often use a short TR, so the recovery between inversions is not complete:
#   the model above then gives a biased T1, which a later tutorial fixes.
#
# ## Resources
# - ISMRM 2024 QMRI study-group challenge data: Zenodo records
#   [10868350](https://doi.org/10.5281/zenodo.10868350) (T1 IR) and
#   [10868361](https://doi.org/10.5281/zenodo.10868361) (T2*); licence on each record page.
# - K. E. Keenan et al., *Quantitative magnetic resonance imaging phantoms: a review and the
#   need for a system phantom*, Magn. Reson. Med. 79:48-61 (2018).
