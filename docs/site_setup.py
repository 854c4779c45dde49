"""The site's first cell: docs/conf.py inserts it, tagged remove-cell, into every notebook.

A static page cannot update a progress bar, so tqdm's bars are switched off here instead of
showing their first frame ("0%") for ever. Every matplotlib figure is stored with alt text
made of its titles and axis labels, for screen readers and for when an image fails to load.
"""

import matplotlib.pyplot as plt
import tqdm.auto
import tqdm.std
from IPython import get_ipython
from matplotlib.figure import Figure


class _NoBar(tqdm.std.tqdm):
    def __init__(self, *args, **kwargs):
        kwargs["disable"] = True
        super().__init__(*args, **kwargs)


tqdm.auto.tqdm = _NoBar
tqdm.auto.trange = lambda *args, **kwargs: _NoBar(range(*args), **kwargs)


def _alt_text(fig):
    title = fig.get_suptitle().replace("\n", " ")
    panels = []
    for ax in fig.axes:
        parts = [ax.get_title(), ax.get_xlabel(), ax.get_ylabel()]
        text = ", ".join(p.replace("\n", " ") for p in parts if p)
        if text and text not in panels:
            panels.append(text)
    described = "; ".join(panels[:8])
    if not title:
        return f"Figure: {described}." if described else "Figure without a title."
    return f"Figure: {title}." + (f" Panels: {described}." if described else "")


plt.figure().clear()  # makes the inline backend register its PNG formatter now
plt.close("all")
_png = get_ipython().display_formatter.formatters["image/png"]
_draw_png = _png.lookup_by_type(Figure)
_previous = _png.for_type(Figure, lambda fig: (_draw_png(fig), {"alt": _alt_text(fig)}))
