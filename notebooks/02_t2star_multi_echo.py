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
# [![Open in Colab](https://colab.research.google.com/assets/colab-badge.svg)](https://colab.research.google.com/github/qmri-tutorials/qmri-tutorials/blob/main/notebooks/02_t2star_multi_echo.ipynb)
# [![Launch Binder](https://mybinder.org/badge_logo.svg)](https://mybinder.org/v2/gh/qmri-tutorials/qmri-tutorials/main?urlpath=lab/tree/notebooks/02_t2star_multi_echo.ipynb)

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
# # T2* mapping from multi-echo gradient-echo data
#
# ## Overview
# After an excitation, the transverse magnetisation of a voxel decays with the time constant
# T2*. A multi-echo gradient-echo sequence samples that decay at several echo times (TE). We fit
#
# $$S(TE) = M_0\, e^{-TE/T_2^*}$$
#
# in every voxel, and report $R_2^* = 1/T_2^*$ as well, the rate that iron and deoxyhaemoglobin
# studies quote. This is the second task of the ISMRM 2024 QMRI challenge; the steps are those of
# notebook 01 (download, load, model, start values, Adam fit, maps). Then we check the method on
# a real kidney scan against the scanner's own R2* map, where a plain fit turns out to fail.
#
# ## Prerequisites
# | Concept | Importance | Notes |
# |---|---|---|
# | [01_t1_inversion_recovery](01_t1_inversion_recovery.ipynb) | necessary | the same tools, introduced step by step |
# | T2* decay and gradient echoes | helpful | explained below |
#
# **Learning goals:** write a decay model yourself, compare two ways to start a fit, and see
# why the parametrisation of a fit matters on real data.
#
# **Estimated time:** 25 minutes; the notebook runs in about a minute on a laptop CPU.

# %%
import time

import torch

import qmri_helpers as qh
from qmri_helpers.plotting import MapSpec

DEVICE = qh.fitting.default_device()
print(f"qmri_helpers {qh.__version__}, fitting on: {DEVICE}")

# %% [markdown]
# ## 1. The data
# Zenodo record [10868361](https://doi.org/10.5281/zenodo.10868361), `T2star.zip`: 11 echoes,
# one DICOM per TE, fetched through the same cached and verified `fetch` as in notebook 01.
# Offline, the embedded phantom is written as a multi-echo series instead (`QMRI_DATA=sample`
# forces it). The line below says which data this run used.

# %%
data = qh.data.load_tutorial_data("t2star")
print(f"Data used: {data.source}\n{data.description}")
images, header = qh.dicom.load_series(data.folder)
print(f"images: {tuple(images.shape)} (TE, z, y, x); TE (ms): {(header.te * 1000).tolist()}")

# %%
fig = qh.plotting.show_series(
    images, header.te, label="TE", ncols=6, title=f"Multi-echo images ({data.source})"
)

# %% [markdown]
# ## 2. The model
# `qh.models.mono_exponential(te)` returns the decay as a function of the maps `m0` and
# `t2star` (in s), and it composes with the same `mse` loss as the IR model of notebook 01.
#
# ### Exercise 1
# Write the model yourself: a function `my_decay(m0, t2star, te)` that returns the signal of
# shape `(n_echoes, ...)` for maps `m0` and `t2star` of shape `(...)` and echo times `te` of
# shape `(n_echoes,)`. Hint: reshape `te` so that it broadcasts against the maps.

# %%
# Write your code here.

# %% [markdown]
# ### Solution for Exercise 1
# Expand the cell below to see one solution.


# %% tags=["solution", "hide-input"] jupyter={"source_hidden": true}
def my_decay(m0, t2star, te):
    te = te.reshape(-1, *([1] * t2star.ndim))  # (n_echoes, 1, ..., 1)
    return m0 * torch.exp(-te / t2star)


# %% [markdown]
# Whatever you wrote, the check below compares it with $M_0 e^{-TE/T_2^*}$ on a few test maps,
# and names the usual slips (a missing minus sign, the echo axis last, a rate for a time):

# %%
qh.exercises.check_decay_model(my_decay)

# %% [markdown]
# ## 3. Two ways to start
# The challenge's seed recipe starts every voxel at **M0 = the shortest echo** and
# **T2\* = 20 ms**. The alternative is the dictionary matching of notebook 01, with a grid of
# T2* values instead of T1: the same function, a different model.

# %%
model = qh.models.mono_exponential(header.te)
seed_start = {"m0": images[0].clone(), "t2star": torch.full(images.shape[1:], 0.020)}
dict_start = qh.fitting.dictionary_match(images, model, "t2star", torch.logspace(-3, 0, 300))
mask = qh.fitting.signal_mask(images)
for name, start in [("seed", seed_start), ("dictionary", dict_start)]:
    print(f"{name:>10} start: loss {qh.models.mse(model(**start), images):.4g}")

fig = qh.plotting.show_maps(
    [
        MapSpec(seed_start["t2star"], "Seed start: T2* = 20 ms", "T2* (ms)", 0, 150, scale=1000),
        MapSpec(dict_start["t2star"], "Dictionary start", "T2* (ms)", 0, 150, scale=1000),
    ],
    mask=mask,
    title="Start values of T2*",
)
# %% [markdown]
# ## 4. Fit with Adam
# The fit of notebook 01, unchanged: all voxels at once, on $\log M_0$ and $\log T_2^*$.

# %%
N_ITER = 1500
result = qh.fitting.fit_adam(model, images, dict_start, n_iter=N_ITER, device=DEVICE)
seed_result = qh.fitting.fit_adam(model, images, seed_start, n_iter=N_ITER, device=DEVICE)
print(
    f"final loss from the dictionary start {result.loss_history[-1]:.4g}, "
    f"from the seed start {seed_result.loss_history[-1]:.4g}"
)
print(f"dictionary start: {result.summary()}\nseed start:       {seed_result.summary()}")

# %% [markdown]
# ## 5. Maps of M0, T2* and R2*

# %%
t2star_map = result.params["t2star"]
r2star_map = torch.where(result.valid, 1 / t2star_map.clamp_min(1e-6), 0.0)
fig = qh.plotting.show_maps(
    [
        MapSpec(result.params["m0"], "M0", "M0 (a.u.)"),
        MapSpec(t2star_map, "T2*", "T2* (ms)", 0, 150, scale=1000),
        MapSpec(r2star_map, "R2* = 1/T2*", "R2* (1/s)", 0, 200),
    ],
    mask=mask & result.valid,
    title=f"Fitted maps ({data.source})",
)
# %%
if data.truth is not None:
    error = qh.metrics.relative_error(t2star_map, data.truth.t2star)
    panel = MapSpec(error, "Relative error of T2*", "relative error (%)", -5, 5, "RdBu_r", 100)
    shown = torch.as_tensor(data.truth.labels > 0)
else:
    residual = result.residual_norm / images.norm(dim=0).clamp_min(1e-12)
    panel = MapSpec(residual, "Relative residual", "‖residual‖ / ‖data‖ (%)", 0, 10, "magma", 100)
    shown = mask
fig = qh.plotting.show_maps([panel], mask=shown, title=f"Error map ({data.source})")
# %%
if data.truth is not None:
    print(" vial  true T2* (ms)  median fit (ms)  median |rel. error| (%)")
    for row in qh.metrics.vial_table(t2star_map, data.truth, "t2star"):
        print(
            f"{row['vial']:5d}  {row['true'] * 1000:13.1f}  {row['median'] * 1000:15.1f}"
            f"  {row['median_abs_rel_error'] * 100:23.2f}"
        )
    in_range = (data.truth.labels >= 1) & (data.truth.labels <= 14)
    in_range &= (data.truth.t2star >= 0.005) & (data.truth.t2star <= 0.120)
    errors = qh.metrics.relative_error(t2star_map, data.truth.t2star)[torch.as_tensor(in_range)]
    median_error = errors.abs().median().item()
    print(f"\nMedian |relative error| in vials with T2* 5-120 ms: {median_error:.2%}")
    assert median_error < 0.03, "the T2* map is off: check the fit settings"
else:
    print("Challenge data: no ground truth; see the residual map above.")

# %% [markdown]
# ## 6. Real data: a kidney scan against the scanner's R2* map
# A phantom with known truth is a necessary test, not a sufficient one. The UK Renal Imaging
# Network's test data hold a breath-hold multi-echo GRE of the abdomen (Siemens Prisma, 3 T,
# 12 in-phase echoes from 4.61 to 55.32 ms) as NIfTI files with BIDS JSON sidecars, and the R2*
# map the scanner computed from the same images. `qh.nifti.load_nifti_series` reads the echo
# times from the sidecars. This section runs where the shared scans are present
# (`$QMRI_SHARED_DATA`, or `../shared/data` beside the project).

# %%
shared = qh.data.shared_data_dir()
kidney = shared / "ukat-kidney-r2star-siemens" if shared else None
if kidney is None or not kidney.is_dir():
    print("The kidney scan is not available here: skipping the real-data section.")
else:
    echoes, kheader = qh.nifti.load_nifti_series(kidney, pattern="00024__*_e*.nii.gz")
    scanner_r2star, _ = qh.nifti.load_nifti(kidney / "00027__R2Star_Images.nii.gz")
    echoes, scanner_r2star = echoes[:, 2:3], scanner_r2star[2:3]  # slice 2 holds both kidneys
    roi = (0, slice(55, 75), slice(40, 55))  # the README's left-kidney ROI: y 55-75, x 40-55
    kmodel = qh.models.mono_exponential(kheader.te)
    kstart = {"m0": echoes[0].clone(), "t2star": torch.full(echoes.shape[1:], 0.020)}
    kmask = echoes[0] > 0.15 * echoes[0].max()  # the body: background voxels hold only noise
    kidneys = (slice(None), slice(35, 100), slice(20, 110))  # a box around both kidneys
    adam_mask = torch.zeros_like(kmask)
    adam_mask[kidneys] = kmask[kidneys]  # Adam fits these voxels only, to keep it quick

    # A plain Adam fit: T2* in ms, parameters and data in their own units.
    def kmodel_ms(m0, t2star_ms):
        return kmodel(m0=m0, t2star=t2star_ms / 1000)

    tic = time.perf_counter()
    plain = qh.fitting.fit_adam(
        kmodel_ms, echoes, {"m0": kstart["m0"], "t2star_ms": kstart["t2star"] * 1000},
        n_iter=2000, lr=0.01, log_params=False, normalise=False, progress=False, mask=adam_mask,
    )  # fmt: skip
    plain_r2star = 1000 / plain.params["t2star_ms"].clamp_min(1e-6)
    ours = qh.fitting.fit_adam(kmodel, echoes, kstart, n_iter=2000, progress=False, mask=adam_mask)
    ours_r2star = 1 / ours.params["t2star"].clamp_min(1e-6)
    adam_seconds = time.perf_counter() - tic
    # The exact least-squares fit of notebook 03: closed-form M0, a 1-D search on T2*.
    tic = time.perf_counter()
    exact = qh.fitting.fit_lm(qh.models.mono_exp_model(kheader.te), echoes, mask=kmask)
    exact_seconds = time.perf_counter() - tic
    exact_r2star = 1 / exact.params["t2star"].clamp_min(1e-6)
    print(
        f"Both Adam fits ({int(adam_mask.sum())} voxels): {adam_seconds:.1f} s; "
        f"the exact fit ({int(kmask.sum())} voxels): {exact_seconds:.2f} s"
    )

    reference = scanner_r2star[roi].median().item()
    fits = [
        ("plain Adam, T2* in ms", plain_r2star),
        ("log-space Adam", ours_r2star),
        ("exact least squares", exact_r2star),
    ]
    for name, r2 in fits:
        value = r2[roi].median().item()
        print(
            f"{name:>22}: median R2* {value:5.1f} 1/s, scanner {reference:.1f} 1/s, "
            f"difference {value / reference - 1:+.1%}"
        )
    differences = {name: r2[roi].median().item() / reference - 1 for name, r2 in fits}
    # What the prose below says; the notebook stops here if a change ever makes it untrue.
    assert 0.15 < differences["plain Adam, T2* in ms"] < 0.25, differences
    assert all(-0.10 < differences[n] < 0 for n in ("log-space Adam", "exact least squares"))
    qh.plotting.show_maps(
        [
            MapSpec(scanner_r2star[kidneys], "Scanner R2*", "R2* (1/s)", 0, 80),
            MapSpec(plain_r2star[kidneys], "Plain Adam (T2* in ms)", "R2* (1/s)", 0, 80),
            MapSpec(ours_r2star[kidneys], "Log-space Adam", "R2* (1/s)", 0, 80),
            MapSpec(exact_r2star[kidneys], "Exact least squares", "R2* (1/s)", 0, 80),
        ],
        mask=kmask[kidneys],
        ncols=2,
        title="Kidney R2*, slice 2 (ukat, Siemens Prisma 3 T)",
    )

# %% [markdown]
# ### What we found
# The plain fit ends about 20% above the scanner's R2* in the kidney, while the same Adam on
# the logarithms of the parameters lands within 10% of it. The reason is scale, not the model:
#
# - Adam moves each parameter by roughly the learning rate per step, **in the parameter's own
#   units**. With `lr = 0.01`, 2000 steps move M0 by at most about 20, but the kidney's M0 is
#   several hundred and its start (the first echo) is already $e^{-TE_1 R_2^*}$, about 10%,
#   too low. M0 stays too low, and the fit makes up for it with a faster decay: R2* too high.
# - Fitting $\log M_0$ and $\log T_2^*$ makes every step *relative*, so M0 of 500 and T2* of
#   45 ms converge at the same pace; dividing the data by its maximum makes the learning rate
#   independent of the scanner's intensity scale. Parametrising in R2* or a better start
#   (the dictionary) help too, but the scaling is what fixes it.
#
# The exact least-squares fit (the solver of notebook 03: M0 in closed form, a 1-D search on
# T2*) lands where log-space Adam does, in a fraction of the time, and needs no learning rate:
# Adam's problem is the path, not the model. The Adam fits run on the body's voxels around
# the kidneys only (`mask=adam_mask`), to keep them quick; the exact fit takes the whole body.
# The remaining gap to the scanner (our fits are lower, by the differences printed above,
# under 10%) is within what the data allow:
# a log-linear fit of the same voxels gives a similar value, and this ROI includes some renal
# sinus, where the scanner's map is higher.
#
# ## 7. The same model on spin-echo T2 data
# A multi-echo **spin echo** decays with T2, not T2*, but the model is the same. The tests of
# this project fit the hazen phantom's GE (8 echoes) and Philips (32 echoes) series this way.

# %% [markdown]
# ## Optional: explore voxel by voxel
# In JupyterLab: slide to a voxel of the phantom to see its echoes, the fit, the dictionary
# start, and T2* with its Cramér-Rao SD; or step through the echoes. Without a widget frontend
# each shows a static figure.

# %%
qh.widgets.voxel_inspector(
    images, header.te, result, qh.models.mono_exponential, dict_start, name="t2star", label="TE"
)

# %%
qh.widgets.image_slider(images, header.te, label="TE")

# %% [markdown]
# ## Summary
# - The decay model is one line of torch; the dictionary, the Adam fit and the plots are those
#   of notebook 01.
# - On the phantom the T2* map is within 3% of the truth for T2* from 5 to 120 ms.
# - On a real kidney scan, a plain Adam fit is biased by 20%; fitting log-parameters on
#   normalised data brings it within 10% of the scanner's map, as does the exact
#   least-squares fit, in a fraction of the time.
#
# ## What's next?
# - Try `lr=0.1` or `N_ITER = 20000` for the plain fit: it gets there, slowly.
# - Later tutorials fit faster and more exactly (closed-form M0, Levenberg-Marquardt).
#
# ## Resources
# - ISMRM 2024 QMRI challenge T2* data: Zenodo record
#   [10868361](https://doi.org/10.5281/zenodo.10868361) (licence on the record page).
# - Kidney data: ukat, UK Renal Imaging Network (GNU GPL v3), travelling kidney pilot study 2019.
