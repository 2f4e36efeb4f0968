"""One self-contained HTML report of an evaluation: metrics, curves, histograms and every test image.

Everything is embedded (PNG/JPEG as base64 data URIs, inline CSS and a few lines of inline JS), so the
file opens from disk, offline, in any browser. Images are downscaled to at most ``max_side`` pixels
to keep the file (and the memory used while writing it) modest.
"""

from __future__ import annotations

import base64
import html
import io
import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .. import metrics
from ..evaluate import Evaluation
from ..io import atomic_write, save_json
from ..result import ImageResult, Prediction
from ..viz import (
    SCALE_MAX,
    colour_bar,
    data_uri,
    mask_picture,
    overlay,
    resize_map,
    resize_mask,
    resize_rgb,
    small_size,
)

__all__ = ["threshold_metrics", "write_report"]

THUMB_SIDE = 256  # longest side of the per-image pictures in the report
NEIGHBOUR_SIDE = 96  # side of the nearest-normal-image thumbnails
N_NEIGHBOURS = 3  # nearest normal images shown per test image


# --------------------------------------------------------------------------- numbers


def threshold_metrics(
    labels: Sequence[int] | np.ndarray, scores: Sequence[float] | np.ndarray, image_threshold: float | None
) -> dict[str, Any]:
    """Image-level decision quality at the calibrated threshold and at the F1-maximising one.

    Returns precision / recall / F1 at ``image_threshold`` (``None`` when there is no threshold or no
    defective image), the false-alarm rate on the good images (fraction flagged), the miss rate on the
    defective ones, the confusion counts, and the F1-maximising threshold with its F1, precision and recall.
    """
    y = np.asarray(labels, dtype=int)
    s = np.asarray(scores, dtype=np.float64)
    good, bad = y == 0, y == 1
    out: dict[str, Any] = {
        "image_threshold": image_threshold,
        "n_good": int(good.sum()),
        "n_defective": int(bad.sum()),
    }
    if image_threshold is not None:
        flagged = s >= image_threshold
        out.update(
            true_positives=int((flagged & bad).sum()),
            false_positives=int((flagged & good).sum()),
            true_negatives=int((~flagged & good).sum()),
            false_negatives=int((~flagged & bad).sum()),
            false_alarm_rate=float(flagged[good].mean()) if good.any() else None,
            miss_rate=float((~flagged[bad]).mean()) if bad.any() else None,
        )
        if bad.any():
            p, r, f1 = metrics.precision_recall_f1(y, s, image_threshold)
            out.update(precision=p, recall=r, f1=f1)
        else:
            out.update(precision=None, recall=None, f1=None)
    else:
        out.update(
            true_positives=None, false_positives=None, true_negatives=None, false_negatives=None,
            false_alarm_rate=None, miss_rate=None, precision=None, recall=None, f1=None,
        )
    if bad.any():
        t_best, f1_best = metrics.best_f1_threshold(y, s)
        p_best, r_best, _ = metrics.precision_recall_f1(y, s, t_best)
        out.update(
            best_f1_threshold=t_best,
            best_f1=f1_best,
            best_f1_precision=p_best,
            best_f1_recall=r_best,
            best_f1_threshold_normalised=t_best / image_threshold if image_threshold else None,
            best_f1_false_alarm_rate=float((s[good] >= t_best).mean()) if good.any() else None,
        )
    else:
        out.update(best_f1_threshold=None, best_f1=None, best_f1_precision=None, best_f1_recall=None,
                   best_f1_threshold_normalised=None, best_f1_false_alarm_rate=None)
    return out


# --------------------------------------------------------------------------- pictures


def _figure(width: float, height: float) -> tuple[Any, Any]:
    """A matplotlib figure on the Agg canvas, outside pyplot's global state (thread-safe, no display)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height))
    FigureCanvasAgg(fig)
    return fig, fig.subplots()


def _fig_uri(fig: Any) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=96, bbox_inches="tight")
    return f"data:image/png;base64,{base64.b64encode(buf.getvalue()).decode('ascii')}"


def _roc_figure(labels: np.ndarray, scores: np.ndarray, auroc: float | None) -> str | None:
    from sklearn.metrics import roc_curve

    if labels.all() or not labels.any():
        return None
    fpr, tpr, _ = roc_curve(labels, scores)
    fig, ax = _figure(4.2, 3.6)
    ax.plot(fpr, tpr, color="#c0392b", lw=2, label=f"AUROC {auroc:.4f}" if auroc is not None else None)
    ax.plot([0, 1], [0, 1], color="#999", lw=1, ls="--")
    ax.set(xlabel="false positive rate (good images flagged)", ylabel="true positive rate",
           title="Image-level ROC", xlim=(0, 1), ylim=(0, 1.02))
    if auroc is not None:
        ax.legend(loc="lower right")
    ax.grid(alpha=0.3)
    return _fig_uri(fig)


def _pro_figure(masks: Sequence[np.ndarray], maps: Sequence[np.ndarray], aupro: float | None) -> str | None:
    try:
        fpr, pro, _ = metrics.pro_curve(masks, maps)
    except ValueError:  # no defect pixels (or no normal pixels): the curve is undefined
        return None
    if fpr.size > 4000:  # millions of points: plot an even subsample (curve is monotone, shape is kept)
        keep = np.unique(np.concatenate([np.linspace(0, fpr.size - 1, 4000).round().astype(int),
                                         [int(np.searchsorted(fpr, 0.3))]]).clip(0, fpr.size - 1))
        fpr, pro = fpr[keep], pro[keep]
    fig, ax = _figure(4.2, 3.6)
    label = f"AUPRO (FPR <= 0.3) {aupro:.4f}" if aupro is not None else None
    ax.plot(fpr, pro, color="#2471a3", lw=2, label=label)
    ax.axvline(0.3, color="#999", lw=1, ls="--")
    ax.set(xlabel="false positive rate (normal pixels)", ylabel="per-region overlap",
           title="PRO curve", xlim=(0, 1), ylim=(0, 1.02))
    if label:
        ax.legend(loc="lower right")
    ax.grid(alpha=0.3)
    return _fig_uri(fig)


def _histogram_figure(labels: np.ndarray, scores: np.ndarray, threshold: float | None,
                      best: float | None) -> str:
    fig, ax = _figure(5.2, 3.6)
    lo, hi = float(scores.min()), float(scores.max())
    for t in (threshold, best):
        if t is not None:
            lo, hi = min(lo, t), max(hi, t)
    bins = np.linspace(lo, hi + 1e-9 * max(1.0, abs(hi)), 31)
    if (labels == 0).any():
        ax.hist(scores[labels == 0], bins=bins, alpha=0.6, color="#27ae60", label=f"good ({(labels == 0).sum()})")
    if (labels == 1).any():
        ax.hist(scores[labels == 1], bins=bins, alpha=0.6, color="#c0392b",
                label=f"defective ({(labels == 1).sum()})")
    if threshold is not None:
        ax.axvline(threshold, color="black", lw=2, label=f"calibrated threshold {threshold:.4g}")
    if best is not None:
        ax.axvline(best, color="#8e44ad", lw=1.5, ls="--", label=f"best-F1 threshold {best:.4g}")
    ax.set(xlabel="image anomaly score", ylabel="test images", title="Image scores")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    return _fig_uri(fig)


# --------------------------------------------------------------------------- html

_CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:1.5em;color:#222;background:#fafafa}
h1{font-size:1.5em;margin-bottom:.2em} h2{font-size:1.2em;margin-top:1.6em}
.muted{color:#666;font-size:.9em}
table.metrics{border-collapse:collapse;margin:.5em 0} table.metrics td,table.metrics th{border:1px solid #ccc;
padding:3px 10px;text-align:left} table.metrics th{background:#eee}
.figs{display:flex;flex-wrap:wrap;gap:12px;align-items:flex-start} .figs img{border:1px solid #ddd;background:#fff}
.controls{position:sticky;top:0;background:#fafafa;padding:.5em 0;z-index:2;border-bottom:1px solid #ddd}
.controls button{margin-right:4px;padding:4px 10px;border:1px solid #888;background:#fff;border-radius:4px;
cursor:pointer}
.controls button.active{background:#333;color:#fff}
table.rows{border-collapse:collapse;width:100%} table.rows td,table.rows th{border-bottom:1px solid #ddd;padding:4px;
vertical-align:top;text-align:left}
table.rows img.pic{max-width:200px;max-height:200px;display:block} table.rows img.nb{width:72px;height:72px}
.nbs{display:flex;gap:4px;flex-wrap:nowrap} .nbs figure{margin:0;font-size:.7em;width:72px;overflow:hidden}
.verdict-defective{color:#c0392b;font-weight:bold} .verdict-good{color:#27ae60;font-weight:bold}
.outcome{font-size:.8em;padding:1px 5px;border-radius:3px;color:#fff} .o-tp{background:#27ae60}
.o-tn{background:#27ae60} .o-fp{background:#e67e22} .o-fn{background:#c0392b}
.name{font-family:monospace;font-size:.85em;word-break:break-all;max-width:14em}
"""

_JS = """
(function(){
  var rows = Array.prototype.slice.call(document.querySelectorAll('#rows tbody tr'));
  var body = document.querySelector('#rows tbody');
  var filter = 'all', desc = true;
  function show(){
    var n = 0;
    rows.forEach(function(r){
      var o = r.dataset.outcome, l = r.dataset.label, ok = true;
      if (filter === 'misses') ok = o === 'fn';
      else if (filter === 'false-alarms') ok = o === 'fp';
      else if (filter === 'defective') ok = l === 'defective';
      else if (filter === 'good') ok = l === 'good';
      r.style.display = ok ? '' : 'none'; if (ok) n++;
    });
    document.getElementById('shown').textContent = n + ' of ' + rows.length + ' images shown';
  }
  document.querySelectorAll('button[data-filter]').forEach(function(b){
    b.addEventListener('click', function(){
      filter = b.dataset.filter;
      document.querySelectorAll('button[data-filter]').forEach(function(x){x.classList.toggle('active', x === b);});
      show();
    });
  });
  document.getElementById('sort').addEventListener('click', function(){
    desc = !desc;
    rows.sort(function(a, b){ var d = parseFloat(a.dataset.score) - parseFloat(b.dataset.score);
                              return desc ? -d : d; });
    rows.forEach(function(r){ body.appendChild(r); });
    this.textContent = desc ? 'score: high to low' : 'score: low to high';
  });
  show();
})();
"""


def _fmt(x: Any, digits: int = 4) -> str:
    if x is None:
        return "–"
    if isinstance(x, float):
        if math.isnan(x):
            return "nan"
        return f"{x:.{digits}f}" if abs(x) >= 1e-3 or x == 0 else f"{x:.{digits}g}"
    return html.escape(str(x))


def _short_name(name: str, parts: int = 2) -> str:
    p = Path(name)
    return "/".join(p.parts[-parts:]) if len(p.parts) >= parts else name


class _Thumbs:
    """Nearest-normal-image thumbnails (kept in the model) as data URIs, each encoded once."""

    def __init__(self, model: Any) -> None:
        self.model = model
        self.cache: dict[int, str] = {}

    def get(self, index: int) -> str:
        if index not in self.cache:
            pic = np.asarray(self.model.thumbnail(index))
            self.cache[index] = data_uri(resize_rgb(pic, small_size(pic.shape[0], pic.shape[1], NEIGHBOUR_SIDE)),
                                         "JPEG")
        return self.cache[index]


def _metrics_table(items: list[tuple[str, Any]]) -> str:
    rows = "".join(f"<tr><th>{html.escape(k)}</th><td>{_fmt(v)}</td></tr>" for k, v in items)
    return f'<table class="metrics">{rows}</table>'


@dataclass
class _Page:
    """What every section of the report reads: one evaluation, its kept maps and the decision numbers."""

    ev: Evaluation
    pred: Prediction
    masks: list[np.ndarray]
    maps: list[np.ndarray]
    y: np.ndarray  # 1 = defective
    scores: np.ndarray
    img_thr: float | None
    pix_thr: float | None
    decision: dict[str, Any]

    @classmethod
    def of(cls, ev: Evaluation) -> _Page:
        pred, masks, maps = ev.kept()
        y = np.asarray(ev.labels, dtype=int)
        scores = np.asarray(pred.scores, dtype=np.float64)
        img_thr: float | None = pred.image_threshold
        decision = threshold_metrics(y, scores, img_thr)
        return cls(ev, pred, masks, maps, y, scores, img_thr, pred.pixel_threshold, decision)


def _outcome(verdict: str | None, label: int) -> str:
    """tp / fp / tn / fn of a verdict against the truth, "" without a threshold."""
    if verdict is None:
        return ""
    return {("defective", 1): "tp", ("defective", 0): "fp", ("good", 0): "tn", ("good", 1): "fn"}[(verdict, label)]


def _mask_cells(page: _Page, i: int, hw: tuple[int, int], small_pred: np.ndarray | None) -> str:
    """The predicted-mask and ground-truth cells of image ``i`` (placeholders where there is nothing to show)."""
    pred_cell = '<td class="muted">no threshold</td>'
    if small_pred is not None:
        pred_cell = f'<td><img class="pic" alt="predicted mask" src="{data_uri(mask_picture(small_pred))}"></td>'
    gt_cell = '<td class="muted">no defect</td>'
    if page.y[i] == 1:
        gt_uri = data_uri(mask_picture(resize_mask(np.asarray(page.masks[i]), hw)), "PNG")
        gt_cell = f'<td><img class="pic" alt="ground truth" src="{gt_uri}"></td>'
    return pred_cell + gt_cell


def _neighbour_cell(res: ImageResult, thumbs: _Thumbs) -> str:
    """The thumbnails of the nearest normal images, with their names."""
    nb_html = []
    for j, nm in list(zip(res.neighbours, res.neighbour_names, strict=True))[:N_NEIGHBOURS]:
        pic = f'<img class="nb" alt="normal image {j}" src="{thumbs.get(j)}">'
        nb_html.append(f'<figure>{pic}<figcaption>{html.escape(_short_name(nm, 1))}</figcaption></figure>')
    return f'<td><div class="nbs">{"".join(nb_html)}</div></td>'


def _regions_note(res: ImageResult) -> str:
    """The image's defect regions in a line: how many, the largest areas."""
    regions = res.regions
    if regions is None:
        return ""
    if not regions:
        return '<br><span class="muted">no defect region</span>'
    areas = ", ".join(f"{r.area:,} px" for r in regions[:3]) + (", ..." if len(regions) > 3 else "")
    return f'<br><span class="muted regions">{len(regions)} region{"s" * (len(regions) > 1)}: {areas}</span>'


def _image_row(page: _Page, rank: int, i: int, thumbs: _Thumbs, max_side: int) -> tuple[str, dict[str, Any]]:
    """Test image ``i``'s table row (pictures downscaled to ``max_side``) and its entry in report.json."""
    res = page.pred[i]
    img = page.ev.picture(i)
    hw = small_size(img.shape[0], img.shape[1], max_side)
    small_img = resize_rgb(img, hw)
    small_map = resize_map(np.asarray(page.maps[i]), hw)
    small_pred = None  # the result's mask (regions under min_area dropped), in the protocol's frame, downscaled
    if res.mask is not None:
        flagged = page.ev.model.prep.mask_to_input(res.mask) if page.ev.protocol == "paper" else res.mask
        small_pred = resize_mask(flagged, hw)
    over = overlay(small_img, small_map, page.pix_thr, small_pred)
    label = "defective" if page.y[i] == 1 else "good"
    outcome = _outcome(res.verdict, int(page.y[i]))
    outcome_html = f' <span class="outcome o-{outcome}">{outcome.upper()}</span>' if outcome else ""
    shown = res.verdict or "–"
    row = (
        f'<tr data-label="{label}" data-outcome="{outcome}" data-score="{res.score!r}">'
        f'<td>{rank + 1}</td>'
        f'<td class="name">{html.escape(_short_name(res.name))}<br><span class="muted">truth: {label}</span></td>'
        f'<td><img class="pic" alt="image" src="{data_uri(small_img, "JPEG")}"></td>'
        f'<td><img class="pic" alt="heatmap overlay" src="{data_uri(over, "JPEG")}"></td>'
        f"{_mask_cells(page, i, hw, small_pred)}"
        f"<td>{_fmt(res.score)}<br><span class=\"muted\">normalised {_fmt(res.normalised_score, 3)}</span></td>"
        f'<td><span class="verdict-{shown}">{shown}</span>{outcome_html}{_regions_note(res)}</td>'
        f"{_neighbour_cell(res, thumbs)}</tr>"
    )
    entry = {"name": res.name, "label": int(page.y[i]), **res.summary(), "outcome": outcome or None,
             "neighbours": list(res.neighbour_names[:N_NEIGHBOURS])}
    return row, entry


def _image_rows(page: _Page, max_side: int) -> tuple[list[str], list[dict[str, Any]]]:
    """Every test image's row, highest score first (ties in test-set order), and its JSON entry."""
    thumbs = _Thumbs(page.ev.model)
    rows: list[str] = []
    per_image: list[dict[str, Any]] = []
    for rank, i in enumerate(np.argsort(-page.scores, kind="stable")):
        row, entry = _image_row(page, rank, int(i), thumbs, max_side)
        rows.append(row)
        per_image.append(entry)
    return rows, per_image


def _curves(page: _Page) -> str:
    """The ROC curve, the PRO curve and the score histogram (those defined) as inline images."""
    row = page.ev.row
    roc = _roc_figure(page.y.astype(bool), page.scores, row.get("image_auroc"))
    pro = _pro_figure(page.masks, page.maps, row.get("aupro"))
    hist = _histogram_figure(page.y, page.scores, page.img_thr, page.decision.get("best_f1_threshold"))
    return "".join(f'<img alt="{alt}" src="{uri}">' for alt, uri in (("ROC curve", roc), ("PRO curve", pro),
                                                                     ("score histogram", hist)) if uri)


def _good_with_flagged_pixels(page: _Page) -> float | None:
    """The fraction of good test images with any pixel over the pixel threshold."""
    if page.pix_thr is None or not (page.y == 0).any():
        return None
    return float(np.mean([float(np.asarray(page.maps[i]).max()) >= page.pix_thr for i in np.flatnonzero(page.y == 0)]))


def _triple(row: dict[str, Any], level: str) -> str:
    values = [row.get(f"{level}_{k}") for k in ("precision", "recall", "f1")]
    return "–" if any(v is None for v in values) else " / ".join(f"{v:.4f}" for v in values)


def _types_table(row: dict[str, Any]) -> str:
    """Per defect type (with the good test images): the AUCs, AUPIMO and the recall at the thresholds."""
    types = row.get("types") or {}
    if not types:
        return ""
    cols = (("image AUROC", "image_auroc"), ("pixel AUROC", "pixel_auroc"), ("AUPRO", "aupro"),
            ("AUPIMO", "aupimo"), ("images flagged", "image_recall"), ("defect pixels flagged", "pixel_recall"))
    head = "".join(f"<th>{html.escape(c)}</th>" for c, _ in cols)
    body = "".join(f"<tr><th>{html.escape(t)} ({r['n_test']})</th>" + "".join(
        f"<td>{_fmt(r.get(k))}</td>" for _, k in cols) + "</tr>" for t, r in types.items())
    return f'<h3>Per defect type</h3><table class="metrics types"><tr><th></th>{head}</tr>{body}</table>'


def _summary_items(row: dict[str, Any], n: int) -> list[tuple[str, Any]]:
    """The metrics row: the three AUCs, the data's size and the timings."""
    return [
        ("image AUROC", row.get("image_auroc")),
        ("pixel AUROC", row.get("pixel_auroc")),
        ("AUPRO (FPR ≤ 0.3)", row.get("aupro")),
        ("AUPIMO (FPR 1e-5 to 1e-4)", row.get("aupimo")),
        ("image precision / recall / F1 at the threshold", _triple(row, "image")),
        ("pixel precision / recall / F1 at the threshold", _triple(row, "pixel")),
        ("training images", row.get("n_train")),
        ("test images", row.get("n_test", n)),
        ("fit seconds", row.get("fit_seconds")),
        ("predict seconds / image", row.get("predict_seconds_per_image")),
    ]


def _threshold_items(page: _Page, calib: dict[str, Any], good_any: float | None) -> list[tuple[str, Any]]:
    """The calibration, the thresholds and the decision quality at the calibrated and the best-F1 threshold."""
    decision = page.decision
    return [
        ("calibration", calib.get("method", "none")),
        ("calibration images", calib.get("n_images")),
        ("target false-alarm rate", calib.get("false_alarm_rate")),
        ("image threshold (calibrated)", page.img_thr),
        ("pixel threshold (calibrated)", page.pix_thr),
        ("false-alarm rate on good test images", decision["false_alarm_rate"]),
        ("good test images with any flagged pixel", good_any),
        ("miss rate on defective test images", decision["miss_rate"]),
        ("precision at calibrated threshold", decision["precision"]),
        ("recall at calibrated threshold", decision["recall"]),
        ("F1 at calibrated threshold", decision["f1"]),
        ("F1-maximising threshold", decision["best_f1_threshold"]),
        ("… normalised (1.0 = calibrated)", decision["best_f1_threshold_normalised"]),
        ("best F1", decision["best_f1"]),
        ("precision / recall at best F1",
         None if decision["best_f1"] is None
         else f"{decision['best_f1_precision']:.4f} / {decision['best_f1_recall']:.4f}"),
    ]


def _metrics_section(page: _Page, calib: dict[str, Any], good_any: float | None) -> str:
    """The two tables of numbers, the confusion counts and the heatmaps' colour bar."""
    d = page.decision
    counts = (f"TP {d['true_positives']}, FP {d['false_positives']}, "
              f"TN {d['true_negatives']}, FN {d['false_negatives']}" if page.img_thr is not None else "")
    bar = data_uri(colour_bar(height=200, width=70, threshold=page.pix_thr), "PNG")
    summary = _metrics_table(_summary_items(page.ev.row, len(page.pred)))
    thresholds = _metrics_table(_threshold_items(page, calib, good_any))
    return f"""<h2>Metrics</h2>
<div class="figs"><div>{summary}{_types_table(page.ev.row)}</div><div>{thresholds}
<p class="muted">{counts}</p></div>
<div><img alt="colour bar" src="{bar}"><p class="muted" style="max-width:18em">Heatmap colours: pixel score divided
by the pixel threshold, on a fixed scale from 0 to {SCALE_MAX:g} (1.0 = threshold, labels show raw scores).
Cyan outline: predicted defect region.</p></div></div>
"""


def _images_section(page: _Page, rows: list[str], per_image: list[dict[str, Any]]) -> str:
    """The filter and sort buttons (with their counts) over the table of test images."""
    n_fn = sum(1 for r in per_image if r["outcome"] == "fn")
    n_fp = sum(1 for r in per_image if r["outcome"] == "fp")
    y = page.y
    return f"""<h2>Test images</h2>
<div class="controls">
<button data-filter="all" class="active">all ({len(page.pred)})</button>
<button data-filter="misses">misses ({n_fn})</button>
<button data-filter="false-alarms">false alarms ({n_fp})</button>
<button data-filter="defective">defective ({int((y == 1).sum())})</button>
<button data-filter="good">good ({int((y == 0).sum())})</button>
&nbsp; sort: <button id="sort">score: high to low</button> &nbsp; <span id="shown" class="muted"></span>
</div>
<table class="rows" id="rows"><thead><tr><th>#</th><th>image</th><th></th><th>heatmap overlay</th>
<th>predicted mask</th><th>ground truth</th><th>score</th><th>verdict</th><th>nearest normal images</th></tr></thead>
<tbody>
{"".join(rows)}
</tbody></table>
"""


def _document(title: str, settings: dict[str, Any], metrics_html: str, curves: str, images_html: str) -> str:
    """The whole page: head with the inline CSS, the sections, the inline script."""
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title>
<meta name="viewport" content="width=device-width, initial-scale=1"><style>{_CSS}</style></head>
<body>
<h1>{html.escape(title)}</h1>
<p class="muted">settings: {html.escape(json.dumps(settings))}</p>
{metrics_html}<h2>Curves</h2>
<div class="figs">{curves}</div>
{images_html}<script>{_JS}</script>
</body></html>
"""


def write_report(path: str | Path, ev: Evaluation, title: str | None = None, max_side: int = THUMB_SIDE) -> Path:
    """Write the HTML report of an evaluation to ``path`` and its numbers to ``path`` with suffix ``.json``.

    ``ev`` is what :func:`spade_ad.evaluate.evaluate_category` returns with ``keep_maps=True`` (the pictures
    need every map): every number per image comes from
    its :class:`~spade_ad.ImageResult`; pictures, maps and ground truth are shown in the protocol's frame
    (the paper's crop, or the whole image). The JSON holds the metrics row, the thresholds,
    :func:`threshold_metrics` and one entry per image.
    """
    path = Path(path)
    page = _Page.of(ev)
    rows, per_image = _image_rows(page, max_side)
    curves = _curves(page)
    good_any = _good_with_flagged_pixels(page)
    calib = ev.model.calibration_ or {}
    settings = {**ev.model.settings.as_dict(), "protocol": ev.protocol}
    doc = _document(title or "spade-ad report", settings, _metrics_section(page, calib, good_any), curves,
                    _images_section(page, rows, per_image))
    atomic_write(path, lambda tmp: tmp.write_text(doc, encoding="utf-8"))
    save_json(path.with_suffix(".json"), {
        "metrics": ev.row,
        "image_threshold": page.img_thr,
        "pixel_threshold": page.pix_thr,
        "calibration": {k: v for k, v in calib.items() if k not in ("image_scores", "map_maxima")},
        "decision": page.decision,
        "good_images_with_flagged_pixels": good_any,
        "settings": settings,
        "images": per_image,
    })
    return path
