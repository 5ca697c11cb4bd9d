"""How two models' outputs compare, per attribute.

Used twice: PyTorch vs the exported FP32 ONNX (``compare``: parity, which must hold to a tight
tolerance), and FP32 ONNX vs each candidate (``gate``: the accuracy gate, a ``GateVerdict`` recorded in
the metadata). The gate compares what a user of the gateway receives (``gateway.client``): the top-1
label, its confidence (and how well calibrated it is against the labels), the top-k list, the
``uncertain`` flag (top-1 confidence below the head's threshold), and the accuracy against the labels;
for a model that reads titles (``TitleGate``) also the ``conflict`` flag (the conflict score above the
attribute's threshold) on the photos sent with their titles, with the same margin as ``uncertain``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

import numpy as np

from fashion.console import table
from fashion.metadata import AttributeVerdict, FlagAgreement, GateVerdict, ParityRow
from fashion.schema import LabelSchema, is_uncertain

# PyTorch vs ONNX Runtime, both FP32: the same arithmetic in a different order.
FP32_ATOL = 1e-4
# Two classes whose reference probabilities are this close are a tie: no decision can rest on which
# one is on top, so a variant that swaps them is not counted as disagreeing (``decisive_agreement``).
TIE = 1e-3


def heads_and_conflict(
    schema: LabelSchema, outputs: Sequence[np.ndarray]
) -> tuple[list[np.ndarray], np.ndarray | None]:
    """A graph's outputs split into the probabilities per attribute (schema order) and, for a model that
    reads titles (one output more), its ``(N, attributes)`` conflict scores."""
    n = len(schema.attributes)
    if len(outputs) not in (n, n + 1):
        raise ValueError(f"{len(outputs)} outputs for {n} attributes")
    return list(outputs[:n]), (np.asarray(outputs[n]) if len(outputs) > n else None)


def compare(
    schema: LabelSchema, reference: Sequence[np.ndarray], candidate: Sequence[np.ndarray]
) -> list[ParityRow]:
    """Per attribute (schema order), compare ``candidate`` probabilities with ``reference``."""
    out = []
    for a, ref, cand in zip(schema.attributes, reference, candidate, strict=True):
        ref, cand = np.asarray(ref, np.float64), np.asarray(cand, np.float64)
        if ref.shape != cand.shape:
            raise ValueError(f"{a.name}: shapes differ ({ref.shape} vs {cand.shape})")
        diff = float(np.max(np.abs(ref - cand))) if ref.size else 0.0
        top = cand.argmax(1)
        agree = float(np.mean(ref.argmax(1) == top)) if len(ref) else 1.0
        picked = np.take_along_axis(ref, top[:, None], axis=1)[:, 0]
        decisive = float(np.mean(picked >= ref.max(1) - TIE)) if len(ref) else 1.0
        out.append(ParityRow(a.name, diff, agree, decisive, len(ref)))
    return out


def worst(rows: Sequence[ParityRow]) -> tuple[float, float]:
    """(largest max |Δp|, lowest decisive agreement) over attributes."""
    return max(r.max_abs_diff for r in rows), min(r.decisive_agreement for r in rows)


def agreement_table(rows: Sequence[ParityRow], title: str = "") -> str:
    body = table(
        ["attribute", "max |Δp|", "argmax agreement", "excluding ties", "images"],
        [
            (
                r.attribute,
                f"{r.max_abs_diff:.2e}",
                f"{r.argmax_agreement:.2%}",
                f"{r.decisive_agreement:.2%}",
                r.images,
            )
            for r in rows
        ],
    )
    return f"{title}\n{body}" if title else body


# The accuracy gate of a candidate (``gate``): per attribute, on the export's gate photos.
GATE_MIN_AGREEMENT = 0.99  # top-1, top-k and flag agreement with FP32
GATE_MAX_ACCURACY_DROP = 0.005  # accuracy against the labels may fall at most 0.5 points below FP32
# A photo whose two best FP32 classes are closer than this is a near-tie for the agreement: FP32 itself
# changes its mind on such photos under ±2 grey levels of noise (see model_repository/README.md).
NEAR_TIE = 0.02
GATE_MAX_MEAN_CONFIDENCE_DELTA = 0.02  # mean |Δ top-1 confidence| over the photos
GATE_MAX_ECE_INCREASE = 0.02  # calibration error (against the labels) may grow at most this much
# A photo whose FP32 confidence is within this of a head's threshold is not counted for the ``uncertain``
# flag's agreement: there a float's last bit decides the flag.
FLAG_MARGIN = 0.02
TOP_K = 3
ECE_BINS = 15


@dataclass(frozen=True)
class TitleGate:
    """A title model's part of the gate: which photos were sent with a title (the last output is the
    conflict score there), and each attribute's conflict threshold (``Checkpoint.conflict_thresholds``)."""

    titled: np.ndarray  # (photos,) bool
    thresholds: Mapping[str, float | None]


@dataclass(frozen=True)
class GateRule:
    """The bounds a candidate must keep, per attribute, against FP32."""

    min_agreement: float = GATE_MIN_AGREEMENT
    max_accuracy_drop: float = GATE_MAX_ACCURACY_DROP
    near_tie: float = NEAR_TIE
    max_mean_confidence_delta: float = GATE_MAX_MEAN_CONFIDENCE_DELTA
    max_ece_increase: float = GATE_MAX_ECE_INCREASE
    flag_margin: float = FLAG_MARGIN
    top_k: int = TOP_K

    def describe(self, labelled: bool) -> str:
        text = (
            f"per attribute: top-1 agreement with FP32 >= {self.min_agreement:.0%} on photos whose two "
            f"best FP32 classes differ by >= {self.near_tie}, top-{self.top_k} list and `uncertain` flag "
            f"agreement >= {self.min_agreement:.0%} (ties within {self.near_tie} and confidences within "
            f"{self.flag_margin} of the threshold excused), mean |Δ confidence| <= "
            f"{self.max_mean_confidence_delta}"
        )
        if labelled:
            text += (
                f", accuracy >= FP32's - {self.max_accuracy_drop * 100:.1f} points, calibration error "
                f"<= FP32's + {self.max_ece_increase}"
            )
        return text


def gate(
    schema: LabelSchema,
    reference: Sequence[np.ndarray],
    candidate: Sequence[np.ndarray],
    labels: np.ndarray | None,
    thresholds: Mapping[str, float] | None = None,
    rule: GateRule = GateRule(),
    title: TitleGate | None = None,
) -> GateVerdict:
    """Does ``candidate`` answer users like the FP32 ``reference``, and is it as accurate on ``labels``?

    ``labels`` is ``(images, attributes)`` class indices with -1 for missing, or None (no labelled photos:
    no accuracy or calibration rule, and the verdict says so). ``thresholds``: each head's abstain
    threshold (the metadata's ``threshold``: top-1 confidence below it is flagged ``uncertain``).
    ``title``: for a model that reads titles, whose outputs end with the conflict scores; the ``conflict``
    flag is compared on the photos that carried a title."""
    reference, ref_conflict = heads_and_conflict(schema, reference)
    candidate, conflict = heads_and_conflict(schema, candidate)
    rows = []
    for j, (a, ref, cand) in enumerate(zip(schema.attributes, reference, candidate, strict=True)):
        truth = None if labels is None else labels[:, j]
        threshold = (thresholds or {}).get(a.name)
        verdict = attribute_verdict(a.name, ref, cand, truth, threshold, rule)
        limit = None if title is None else title.thresholds.get(a.name)
        if limit is not None and title is not None and ref_conflict is not None and conflict is not None:
            rows_titled = np.asarray(title.titled, bool)
            flag = flag_agreement(
                "conflict",
                ref_conflict[rows_titled, j],
                conflict[rows_titled, j],
                limit,
                rule.flag_margin,
                above=True,
            )
            verdict = replace(verdict, flags=(*verdict.flags, flag))
            verdict = replace(verdict, failures=failures(verdict, rule))
        rows.append(verdict)
    text = rule.describe(labels is not None)
    if title is not None:
        text += (
            f"; the `conflict` flag (score above the attribute's threshold) agreement >= "
            f"{rule.min_agreement:.0%} on the {int(np.sum(title.titled))} photos sent with their titles "
            f"(scores within {rule.flag_margin} of the threshold excused)"
        )
    return GateVerdict(
        attributes=tuple(rows),
        images=len(reference[0]) if len(reference) else 0,
        labelled=labels is not None,
        rule=text,
    )


def attribute_verdict(
    name: str,
    reference: np.ndarray,
    candidate: np.ndarray,
    truth: np.ndarray | None,
    threshold: float | None,
    rule: GateRule,
) -> AttributeVerdict:
    """One attribute's comparison and the rules it broke."""
    ref, cand = np.asarray(reference, np.float64), np.asarray(candidate, np.float64)
    agreement, decisive = top1_agreement(ref, cand, rule.near_tie)
    conf_ref, conf = ref.max(1), cand.max(1)
    delta = np.abs(conf - conf_ref)
    k = min(rule.top_k, ref.shape[1])
    flags = () if threshold is None else (uncertain_agreement(conf_ref, conf, threshold, rule.flag_margin),)
    verdict = AttributeVerdict(
        attribute=name,
        agreement=agreement,
        agreement_images=decisive,
        near_ties=len(ref) - decisive,
        max_abs_diff=float(np.abs(ref - cand).max()) if ref.size else 0.0,
        confidence_max_delta=float(delta.max()) if len(delta) else 0.0,
        confidence_mean_delta=float(delta.mean()) if len(delta) else 0.0,
        top_k=k,
        top_k_agreement=top_k_agreement(ref, cand, k, rule.near_tie),
        flags=flags,
        **labelled_fields(ref, cand, truth),
    )
    return replace(verdict, failures=failures(verdict, rule))


def top1_agreement(ref: np.ndarray, cand: np.ndarray, near_tie: float) -> tuple[float, int]:
    """(share of decisive photos whose top class is FP32's, the number of decisive photos): photos whose
    two best FP32 classes are a near-tie are not counted."""
    top2 = np.sort(ref, axis=1)[:, -2:] if ref.shape[1] > 1 else np.zeros((len(ref), 2))
    decisive = (top2[:, 1] - top2[:, 0]) >= near_tie
    same = ref.argmax(1) == cand.argmax(1)
    return (float(same[decisive].mean()) if decisive.any() else 1.0), int(decisive.sum())


def top_k_agreement(ref: np.ndarray, cand: np.ndarray, k: int, near_tie: float) -> float:
    """Share of photos whose top-k list (in order) is FP32's, a class swapped with one tied within
    ``near_tie`` in FP32 excused: at every rank, the candidate's class has FP32's probability at that rank,
    up to the tie."""
    if not len(ref):
        return 1.0
    order = np.argsort(-cand, axis=1, kind="stable")[:, :k]
    picked = np.take_along_axis(ref, order, axis=1)
    wanted = -np.sort(-ref, axis=1)[:, :k]
    return float(np.all(picked >= wanted - near_tie, axis=1).mean())


def uncertain_agreement(
    conf_ref: np.ndarray, conf: np.ndarray, threshold: float, margin: float
) -> FlagAgreement:
    """The ``uncertain`` flag (confidence below ``threshold``) of the candidate against FP32's, on the
    photos whose FP32 confidence is at least ``margin`` away from the threshold."""
    return flag_agreement("uncertain", conf_ref, conf, threshold, margin, above=False)


def flag_agreement(
    name: str, ref: np.ndarray, value: np.ndarray, threshold: float, margin: float, *, above: bool
) -> FlagAgreement:
    """A flag raised when a score is above ``threshold`` (``conflict``) or, as ``fashion.schema.is_uncertain``
    says, below it (``uncertain``): the candidate's against FP32's, on the photos whose FP32 score is at least
    ``margin`` from the threshold."""
    if above:
        flag_ref, flag = ref > threshold, value > threshold
    else:
        flag_ref, flag = is_uncertain(ref, threshold), is_uncertain(value, threshold)
    counted = np.abs(ref - threshold) >= margin
    agreement = float((flag_ref == flag)[counted].mean()) if counted.any() else 1.0
    return FlagAgreement(
        flag=name,
        threshold=float(threshold),
        margin=margin,
        agreement=agreement,
        images=int(counted.sum()),
        at_threshold=int((~counted).sum()),
        raised_fp32=int(flag_ref.sum()),
        raised=int(flag.sum()),
    )


def labelled_fields(ref: np.ndarray, cand: np.ndarray, truth: np.ndarray | None) -> dict[str, Any]:
    """Accuracy and calibration error of FP32 and the candidate on the labelled photos (none: empty)."""
    if truth is None:
        return {}
    known = truth >= 0
    if not known.any():
        return {"labelled_images": 0}
    right_ref = ref[known].argmax(1) == truth[known]
    right = cand[known].argmax(1) == truth[known]
    return {
        "labelled_images": int(known.sum()),
        "accuracy_fp32": float(right_ref.mean()),
        "accuracy": float(right.mean()),
        "ece_fp32": expected_calibration_error(ref[known].max(1), right_ref),
        "ece": expected_calibration_error(cand[known].max(1), right),
    }


def expected_calibration_error(confidence: np.ndarray, correct: np.ndarray, bins: int = ECE_BINS) -> float:
    """|accuracy − mean confidence| per equal-width confidence bin, weighted by the bin's photos."""
    which = np.minimum((confidence * bins).astype(int), bins - 1)
    total = 0.0
    for b in np.unique(which):
        in_bin = which == b
        total += in_bin.mean() * abs(float(correct[in_bin].mean()) - float(confidence[in_bin].mean()))
    return float(total)


def failures(v: AttributeVerdict, rule: GateRule) -> tuple[str, ...]:
    """The rules ``v`` breaks, in words (empty: it passed)."""
    out = []
    if v.agreement < rule.min_agreement:
        out.append(f"top-1 agreement {v.agreement:.2%} < {rule.min_agreement:.0%}")
    if v.top_k_agreement < rule.min_agreement:
        out.append(f"top-{v.top_k} agreement {v.top_k_agreement:.2%} < {rule.min_agreement:.0%}")
    if v.confidence_mean_delta > rule.max_mean_confidence_delta:
        out.append(f"mean |Δ confidence| {v.confidence_mean_delta:.3f} > {rule.max_mean_confidence_delta}")
    out += [
        f"{f.flag} agreement {f.agreement:.2%} < {rule.min_agreement:.0%}"
        for f in v.flags
        if f.agreement < rule.min_agreement
    ]
    if v.accuracy is not None and v.accuracy_fp32 is not None:
        if v.accuracy < v.accuracy_fp32 - rule.max_accuracy_drop - 1e-12:
            out.append(f"accuracy {v.accuracy:.2%} < FP32's {v.accuracy_fp32:.2%} - {rule.max_accuracy_drop}")
    if v.ece is not None and v.ece_fp32 is not None and v.ece > v.ece_fp32 + rule.max_ece_increase:
        out.append(f"calibration error {v.ece:.3f} > FP32's {v.ece_fp32:.3f} + {rule.max_ece_increase}")
    return tuple(out)


def gate_table(verdict: GateVerdict, title: str = "") -> str:
    def pct(value: float | None) -> str:
        return "" if value is None else f"{value:.2%}"

    flags = ["uncertain"] + (["conflict"] if any(r.flag("conflict") for r in verdict.attributes) else [])
    rows = []
    for r in verdict.attributes:
        delta = r.accuracy_delta
        agreements = [r.flag(name) for name in flags]
        rows.append(
            (
                r.attribute,
                pct(r.agreement),
                r.agreement_images,
                pct(r.top_k_agreement),
                f"{r.confidence_mean_delta:.3f}",
                *("" if f is None else pct(f.agreement) for f in agreements),
                pct(r.accuracy_fp32),
                pct(r.accuracy),
                "" if delta is None else f"{delta * 100:+.2f}",
                "yes" if r.passed else "NO: " + "; ".join(r.failures),
            )
        )
    headers = ["attribute", "top-1", "photos", "top-k", "mean |Δconf|", *flags, "acc FP32", "acc"]
    body = table([*headers, "Δ points", "passed"], rows)
    return f"{title}\n{body}" if title else body
