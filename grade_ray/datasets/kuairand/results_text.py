"""results.md and its interpretation paragraph, computed from the results dict.

The report is data first: each table is a header and rows of cells
(:func:`per_label_table`, ... and the shared :func:`~grade_ray.jobs.replay.ranking_table`) rendered by
:func:`~grade_ray.jobs.replay.markdown_table`; each section is a list of blocks (a heading, a
paragraph, a table) and :func:`results_markdown` joins them with blank lines.
The interpretation is one sentence per named part (:func:`interpret`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from grade_ray.datasets.kuairand.replay import SEGMENT_FEATURE
from grade_ray.jobs.paired import BASELINE
from grade_ray.jobs.replay import (
    VS,
    Block,
    cell,
    diff_cell,
    diff_ci,
    fmt,
    interval,
    markdown_table,
    ranking_table,
)

# ---------------------------------------------------------------------------
# Numbers as text


def _m(results: dict, arm: str, metric: str) -> dict[str, Any]:
    return results["arms"][arm]["metrics"][metric]


def _verdict(results: dict, arm: str, metric: str = "composite") -> str:
    """'higher' / 'lower' / 'indistinguishable' vs best static (paired 95% CI)."""
    d = results["arms"][arm].get(VS, {}).get(metric)
    if not d or d["diff"] is None:
        return "n/a"
    if not d["significant"]:
        return "indistinguishable"
    return "higher" if d["diff"] > 0 else "lower"


def _overlap(results: dict, a: str, b: str, metric: str = "composite") -> bool:
    x, y = _m(results, a, metric), _m(results, b, metric)
    if None in (x["ci_low"], x["ci_high"], y["ci_low"], y["ci_high"]):
        return True
    return not (x["ci_low"] > y["ci_high"] or y["ci_low"] > x["ci_high"])


def _names(names: Sequence[str], most: int = 8) -> str:
    if not names:
        return "none"
    dow = [n for n in names if n.startswith("dow=")]
    shown = (dow + [n for n in names if n not in dow])[:most]
    more = f" and {len(names) - len(shown)} more" if len(names) > len(shown) else ""
    return f"{len(names)}: {', '.join(shown)}{more}"


def _mm(s: dict) -> str:
    return f"{s['list_length']['median']:g} / {s['list_length']['max']}"


def _hist(s: dict) -> str:
    return ", ".join(f"{k}: {v}" for k, v in s["list_length"]["histogram"].items() if v)


# ---------------------------------------------------------------------------
# The interpretation: one sentence per part


def _grade_sentence(results: dict) -> tuple[str, bool]:
    """The GRADE vs best static sentence and whether GRADE is ahead after adjustment."""
    arms = results["arms"]
    g, b = _m(results, "GRADE", "composite"), _m(results, BASELINE, "composite")
    d = arms["GRADE"][VS]["composite"]
    dp = arms["GRADE"][VS]["r_post"]
    verdict = _verdict(results, "GRADE")
    ahead = verdict == "higher" and d["significant_adjusted"]
    if verdict == "higher" and not d["significant_adjusted"]:
        word = "is ahead of, at the 95% level only,"
    else:
        word = {
            "higher": "beats",
            "lower": "is worse than",
            "indistinguishable": "does not beat",
        }.get(verdict, "cannot be compared with")
    overlap = "overlap" if _overlap(results, "GRADE", BASELINE) else "do not overlap"
    text = (
        f"On {results['evidence']['eval']['requests']} held-out requests "
        f"({', '.join(map(str, results['dates']['eval']))}), GRADE {word} the best static "
        f"weights searched on the training days: composite {fmt(g['value'])} vs "
        f"{fmt(b['value'])}, paired difference {diff_ci(d)} (R_post NDCG@{results['k']}: {diff_ci(dp)})"
        f"; with a Bonferroni correction for the {d['comparisons']} arms compared with best "
        f"static the interval is {interval(d, adjusted=True)}"
        f", and the two arms' marginal 95% CIs {overlap}."
    )
    return text, ahead


def _other_arms_sentence(results: dict) -> str | None:
    """Every other arm's composite difference to best static and its verdict."""
    arms = results["arms"]
    others = [
        f"{arm} {fmt(arms[arm][VS]['composite']['diff'], sign=True)} ({_verdict(results, arm)})"
        for arm in arms
        if arm not in ("GRADE", BASELINE)
    ]
    if not others:
        return None
    return "Other arms vs best static (composite, paired 95%): " + "; ".join(others) + "."


def _personalization_gain(results: dict) -> bool:
    """GRADE beats its own mean weights used as one static vector (paired 95% CI)."""
    pers = results.get("personalization", {}).get("composite")
    return bool(pers and pers["significant"] and pers["diff"] > 0)


def _personalization_sentence(results: dict) -> str | None:
    """What the per-request variation of GRADE's weights adds over its mean weights."""
    pers = results.get("personalization", {}).get("composite")
    if not pers:
        return None
    what = (
        "adds a measurable gain"
        if _personalization_gain(results)
        else ("costs" if pers["significant"] else "adds nothing measurable")
    )
    gw = results["weights"]["GRADE"]
    return (
        f"Personalization itself: GRADE minus its own mean weights (over the training "
        f"requests) used as one static vector for everyone is {diff_ci(pers)}, so the "
        f"per-request variation of its weights (mean std {gw['spread']:.3f} across eval "
        f"requests, {gw['polarized_frac']:.0%} of them polarized) {what}."
    )


def _headroom_sentence(results: dict) -> str:
    """How much any weights could add on the eval day, and why (short lists, sparse labels)."""
    ev, hr = results["evidence"]["eval"], results["headroom"]
    n = ev["requests"]
    c = hr["composite"]
    gap_static = (c["eval_tuned_static"] or 0) - (c["train_best_static"] or 0)
    gap_oracle = (c["per_request_oracle"] or 0) - (c["train_best_static"] or 0)
    spread = (c["train_best_static"] or 0) - (c["worst_static"] or 0)
    bm = _m(results, BASELINE, "composite")
    width = (bm["ci_high"] or 0) - (bm["ci_low"] or 0)
    head = "The measurable headroom is small" if gap_static < width else "There is some headroom"
    with_pos = ev["requests_with_positive_post_gain"]
    labels = ev["labels"]
    return (
        f"{head}: re-tuning one static vector on the eval day itself (in-sample) would add "
        f"{gap_static:+.4f} composite (the best static arm's 95% CI is {width:.4f} wide), the "
        f"whole range from the worst to the best static grid vector is {spread:.4f}, and even "
        f"an unattainable per-request oracle over the grid adds {gap_oracle:+.4f}. Only "
        f"{hr['weight_sensitive_requests']} of {n} eval requests "
        f"({hr['weight_sensitive_requests'] / max(n, 1):.0%}) change their reward at all across "
        f"the grid: lists are short (mean {ev['list_length']['mean']:.2f} items, "
        f"{ev['list_length']['histogram'].get('2', 0)} requests with 2), {n - with_pos} "
        f"requests ({1 - with_pos / max(n, 1):.0%}) have no positive-gain feedback, and the "
        f"rare labels are very sparse (like on "
        f"{labels.get('like', {}).get('requests_with_positive', 0)} requests, follow on "
        f"{labels.get('follow', {}).get('requests_with_positive', 0)})."
    )


def _context_sentence(results: dict) -> str:
    """Whether the context carries usable signal for the weights."""
    ctx = results["evidence"]["context"]
    seg_v = _verdict(results, "segment_static") if "segment_static" in results["arms"] else "n/a"
    lead = (
        "The context carries some usable signal for the weights"
        if _personalization_gain(results) or seg_v == "higher"
        else "There is little evidence that the context carries usable signal for the weights"
    )
    return (
        f"{lead}: it is {ctx['context_dim']} features of static user attributes plus hour, "
        f"day of week and list length; {ctx['eval_users_seen_in_train_split']} of "
        f"{ctx['eval_users']} eval users appear in the policy's training split and only "
        f"{results['evidence']['train']['users_with_repeat_requests']} training users have more "
        f"than one request; a per-{SEGMENT_FEATURE} static baseline is {seg_v} vs the global "
        "static."
    )


def _conclusion(results: dict, ahead: bool) -> str | None:
    """What the slice shows about personalized fusion (None without a GRADE arm)."""
    if "GRADE" not in results["arms"]:
        return None
    if not ahead and not _personalization_gain(results):
        return (
            "So this slice does not show a benefit of personalized fusion: it is too small, "
            "its lists too short and its feedback too sparse to measure one, which says little "
            "about larger logs with longer candidate lists."
        )
    if not _personalization_gain(results):
        return (
            "What GRADE gains over best static here comes from a better global trade-off (its "
            "mean weights), not from personalization."
        )
    return (
        "Personalization is measurable on this slice, but small against its bootstrap "
        "uncertainty; confirm it on further days (convert_more + grade-ray evaluate)."
    )


def interpret(results: dict) -> str:
    """An honest paragraph computed from the numbers: the parts below that apply, in order."""
    grade, ahead = _grade_sentence(results) if "GRADE" in results["arms"] else (None, False)
    parts = (
        grade,
        _other_arms_sentence(results),
        _personalization_sentence(results),
        _headroom_sentence(results),
        _context_sentence(results),
        _conclusion(results, ahead),
    )
    return " ".join(p for p in parts if p)


# ---------------------------------------------------------------------------
# results.md: tables as rows of cells, sections as blocks


def per_label_table(results: dict, metric: str) -> Block:
    """``metric/<label>`` (ndcg or gauc) per arm and label; n = requests it is defined on."""
    arms, labels = results["arms"], results["labels"]
    first = arms[next(iter(arms))]["metrics"]
    header = ["arm", *(f"{lab} (n={first[f'{metric}/{lab}']['n']})" for lab in labels)]
    rows = [
        [arm, *(cell(row["metrics"][f"{metric}/{lab}"]) for lab in labels)]
        for arm, row in arms.items()
    ]
    return markdown_table(header, rows)


def ndcg_diff_table(results: dict) -> Block:
    """Paired NDCG differences to best static per arm and label."""
    labels = results["labels"]
    rows = [
        [arm, *(diff_cell(row[VS].get(f"ndcg/{lab}")) for lab in labels)]
        for arm, row in results["arms"].items()
        if VS in row
    ]
    return markdown_table(["arm", *labels], rows)


def weights_table(results: dict) -> Block:
    """Mean weight per task, spread and polarized share per arm on the eval requests."""
    tasks = results["tasks"]
    header = ["arm", *(f"mean w_{t}" for t in tasks), "spread (mean std)"]
    header.append("share with max w > 0.9")
    rows = [
        [
            arm,
            *(f"{w['mean'][t]:.3f}" for t in tasks),
            fmt(w["spread"], 3),
            fmt(w["polarized_frac"], 3),
        ]
        for arm, w in results["weights"].items()
    ]
    return markdown_table(header, rows)


HEADROOM_ROWS = (
    ("worst_static", "worst static grid vector"),
    ("train_best_static", "best static searched on training days"),
    ("eval_tuned_static", "best static tuned on the eval day"),
    ("per_request_oracle", "per-request oracle over the grid"),
)


def headroom_table(results: dict) -> Block:
    """In-sample references on the eval day: composite and R_post."""
    hr = results["headroom"]
    rows = [
        [label, fmt(hr["composite"][key]), fmt(hr["r_post"][key])] for key, label in HEADROOM_ROWS
    ]
    return markdown_table(["", "composite", "R_post"], rows)


def evidence_table(results: dict) -> Block:
    """The train and eval splits side by side: sizes, list lengths, gains, label sparsity."""
    tr, te = results["evidence"]["train"], results["evidence"]["eval"]

    def both(key: str) -> tuple[Any, Any]:
        return tr[key], te[key]

    rows = [
        ("requests", *both("requests")),
        ("impressions", *both("impressions")),
        ("users", *both("users")),
        ("users with > 1 request", *both("users_with_repeat_requests")),
        (
            "mean list length",
            fmt(tr["list_length"]["mean"], 2),
            fmt(te["list_length"]["mean"], 2),
        ),
        ("median / max list length", _mm(tr), _mm(te)),
        ("list length histogram", _hist(tr), _hist(te)),
        ("requests with any positive gain", *both("requests_with_positive_post_gain")),
        ("order-sensitive requests (gains not all equal)", *both("order_sensitive_requests")),
    ]
    for lab in results["labels"]:
        a, b = tr["labels"][lab], te["labels"][lab]
        rows.append(
            (
                f"{lab}: impression rate / requests with a positive",
                f"{fmt(a['impression_positive_rate'])} / {a['requests_with_positive']}",
                f"{fmt(b['impression_positive_rate'])} / {b['requests_with_positive']}",
            )
        )
    return markdown_table(["", "train split", "eval split"], rows)


def _intro(results: dict) -> list[Block]:
    dates, n = results["dates"], results["evidence"]["eval"]["requests"]
    return [
        ["# GRADE on KuaiRand-Pure: logged replay"],
        [
            f"Upstream MMoE trained on {dates['upstream_train']}; policy trained on "
            f"{dates['policy_train']}; evaluated on {dates['eval']} ({n} "
            f"requests). 95% bootstrap CIs over requests ({results['bootstrap']['resamples']} "
            "resamples, the same resamples for every arm); Δ = paired difference to best_static "
            "(* = its 95% CI excludes 0, ** = also its Bonferroni-adjusted CI over the arms "
            "compared)."
        ],
    ]


def _quality_sections(results: dict) -> list[Block]:
    """Ranking quality, NDCG and GAUC per feedback type."""
    k = results["k"]
    return [
        ["## Ranking quality"],
        [
            f"Composite = l1·R_post + l2·R_prior (NDCG@{k}; the objective best_static maximises, "
            "R_format left out). R_post = NDCG@k with the configured gains over the observed "
            "labels."
        ],
        ranking_table(results),
        [f"## NDCG@{k} per feedback type"],
        [
            "Over the requests with at least one positive of that label (n below); for hate, "
            "lower is better."
        ],
        per_label_table(results, "ndcg"),
        ["Paired Δ NDCG vs best_static:"],
        ndcg_diff_table(results),
        ["## GAUC per feedback type"],
        [
            "Per-request AUC of the fused score, weighted by list length, over requests with "
            "both classes (n below)."
        ],
        per_label_table(results, "gauc"),
    ]


def _weights_sections(results: dict) -> list[Block]:
    """Fusion weights (and skipped ablations), then the headroom references."""
    skipped = {n: v["skipped"] for n, v in results["variants"].items() if "skipped" in v}
    hr = results["headroom"]
    blocks = [["## Fusion weights on the eval requests"], weights_table(results)]
    if skipped:
        blocks.append(["Skipped ablations: " + "; ".join(f"{n}: {r}" for n, r in skipped.items())])
    return [
        *blocks,
        ["## Headroom (in-sample references on the eval day, not deployable)"],
        headroom_table(results),
        [
            f"Requests whose composite changes at all across the {hr['grid_points']}-point grid: "
            f"{hr['weight_sensitive_requests']} of {results['evidence']['eval']['requests']}."
        ],
    ]


def _evidence_sections(results: dict) -> list[Block]:
    """Data evidence: the split table, the context, the upstream model's AUC."""
    ctx = results["evidence"]["context"]
    auc = results["conversion"].get("upstream_auc_scored_days") or {}
    return [
        ["## Data evidence"],
        evidence_table(results),
        [
            f"Context: {ctx['context_dim']} features, {ctx['distinct_eval_contexts']} distinct "
            f"vectors among the eval requests; {ctx['eval_users_seen_in_train_split']} of "
            f"{ctx['eval_users']} eval users appear in the policy's training split. Columns "
            f"constant on the training split (made inert in the policy): "
            f"{_names(ctx['constant_on_train'])} "
            f"({ctx['eval_requests_with_unseen_value_in_a_constant_column']} eval requests take "
            "another value there)."
        ],
        [
            "Upstream MMoE AUC on the scored days: "
            + (", ".join(f"{t} {v}" for t, v in auc.items()) or "n/a")
            + "."
        ],
    ]


def _closing_sections(results: dict) -> list[Block]:
    lic = results["licence"]
    return [
        ["## What this shows"],
        [results["interpretation"]],
        ["## Licence and attribution"],
        [lic["notice"]],
        [f"Please cite: {lic['attribution']}"],
    ]


def results_markdown(results: dict) -> str:
    """results.md: tables, weights, data evidence, interpretation, licence."""
    blocks = [
        *_intro(results),
        *_quality_sections(results),
        *_weights_sections(results),
        *_evidence_sections(results),
        *_closing_sections(results),
    ]
    return "\n\n".join("\n".join(b) for b in blocks) + "\n"
