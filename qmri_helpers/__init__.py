"""Helpers for the qmri-tutorials notebooks: data, DICOM loading, models, fitting, plots.

Each module holds one concern; the notebooks call them in the order of a fit::

    import qmri_helpers as qh

    data = qh.data.load_tutorial_data("t1_ir")
    images, header = qh.dicom.load_series(data.folder)
    model = qh.models.inversion_recovery(header.ti)
    start = qh.fitting.dictionary_match(images, model, "t1", t1_grid)
    result = qh.fitting.fit_adam(model, images, start)
"""

from . import (
    bids,
    data,
    dicom,
    epg,
    exercises,
    export,
    fitting,
    metrics,
    models,
    nifti,
    phantom,
    phantom_qa,
    plotting,
    qa_report,
    reference,
    solvers,
    spheres,
    t2_fitting,
    t2_qa,
    validation,
    widgets,
)

__all__ = [
    "bids",
    "data",
    "dicom",
    "epg",
    "exercises",
    "export",
    "fitting",
    "metrics",
    "models",
    "nifti",
    "phantom",
    "phantom_qa",
    "plotting",
    "qa_report",
    "reference",
    "spheres",
    "solvers",
    "t2_fitting",
    "t2_qa",
    "validation",
    "widgets",
]
__version__ = "0.1.0"
