"""Per-case class labels inside an ordinary nnU-Net raw dataset, and ``csm_nnunet import-labels`` (CSV -> dataset.json).

Convention (README "Classification labels"): dataset.json carries

    "class_names": ["benign", "malignant"],            # two or more, index = class id
    "classification_labels": {"case_001": 1, ...}      # every training case, an integer class id

``labelsTr`` stays what nnU-Net needs for planning (a lesion mask where one exists gives the crop's region of
interest; a dataset without masks gets body masks from ``csm_nnunet prepare-unlabeled``). A user with images and a
CSV ``case,label`` runs ``csm_nnunet import-labels --csv labels.csv --dataset $nnUNet_raw/DatasetXXX_Name``; labels
in the CSV may be class ids or class names.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import sys
import warnings
from collections.abc import Iterable, Mapping, Sequence

from csm_nnunet.fileio import write_json_atomically

LABELS_KEY = "classification_labels"
NAMES_KEY = "class_names"


class ClassLabelError(ValueError):
    """Malformed class labels; the message names the file/field and the fix."""


def read_class_labels(dataset_json: Mapping, case_ids: Iterable[str], source: str = "dataset.json"
                      ) -> tuple[dict[str, int], list[str]]:
    """Validate ``classification_labels``/``class_names`` of ``dataset_json`` against the dataset's ``case_ids``.

    Returns ``({case: class id}, class names)`` for exactly ``case_ids``. Raises :class:`ClassLabelError` for a
    missing key, a case without a label, a label that is not an integer class id of ``class_names``, or a single
    class overall; warns (and ignores them) for labels of cases the dataset does not have.
    """
    fix = "add them with `csm_nnunet import-labels --csv labels.csv --dataset <raw dataset folder>`"
    if LABELS_KEY not in dataset_json:
        raise ClassLabelError(f"{source} has no {LABELS_KEY!r}: per-case class labels are needed for classification; "
                              f"{fix}")
    labels = dataset_json[LABELS_KEY]
    if not isinstance(labels, Mapping):
        raise ClassLabelError(f"{source}: {LABELS_KEY!r} must map case ids to integer class ids, got "
                              f"{type(labels).__name__}")
    names = dataset_json.get(NAMES_KEY)
    if names is None:
        ids = {v for v in labels.values() if isinstance(v, int) and not isinstance(v, bool)}
        names = [str(i) for i in range(max(ids) + 1)] if ids else []
    if not isinstance(names, Sequence) or isinstance(names, str) or len(names) < 2:
        raise ClassLabelError(f"{source}: {NAMES_KEY!r} must list two or more class names, got {names!r}")
    names = [str(n) for n in names]
    cases = sorted(set(case_ids))
    bad = {c: v for c, v in labels.items()
           if isinstance(v, bool) or not isinstance(v, int) or not 0 <= v < len(names)}
    if bad:
        shown = dict(list(bad.items())[:5])
        raise ClassLabelError(f"{source}: {LABELS_KEY!r} values must be integer class ids 0..{len(names) - 1} "
                              f"({', '.join(f'{i}={n}' for i, n in enumerate(names))}); offending: {shown}"
                              f"{' ...' if len(bad) > 5 else ''}")
    missing = [c for c in cases if c not in labels]
    if missing:
        raise ClassLabelError(f"{source}: {len(missing)} case(s) have no class label: {missing[:10]}"
                              f"{' ...' if len(missing) > 10 else ''}; {fix}, or remove those cases")
    extra = sorted(set(labels) - set(cases))
    if extra:
        warnings.warn(f"{source}: {len(extra)} class label(s) name cases the dataset does not have, ignored: "
                      f"{extra[:10]}{' ...' if len(extra) > 10 else ''}", stacklevel=2)
    out = {c: int(labels[c]) for c in cases}
    if len(set(out.values())) < 2:
        only = names[next(iter(out.values()))] if out else "-"
        raise ClassLabelError(f"{source}: every case has class {only!r}; a classifier needs at least two classes "
                              f"among the training cases")
    return out, names


def case_ids_of(dataset_folder: str, dataset_json: Mapping) -> list[str]:
    """Training case ids of a raw dataset: from ``imagesTr`` files ``<case>_XXXX<ending>`` (or the ``dataset`` key)."""
    if "dataset" in dataset_json:
        return sorted(dataset_json["dataset"])
    ending = dataset_json.get("file_ending", ".nii.gz")
    folder = os.path.join(dataset_folder, "imagesTr")
    if not os.path.isdir(folder):
        raise ClassLabelError(f"{dataset_folder} has no imagesTr folder; pass an nnU-Net raw dataset folder")
    cases = {f[: -len(ending) - 5] for f in os.listdir(folder) if f.endswith(ending) and len(f) > len(ending) + 5}
    return sorted(cases)


def parse_labels_csv(path: str, class_names: Sequence[str] | None) -> tuple[dict[str, int], list[str]]:
    """Read ``case,label`` rows (a header row is allowed). Labels are class ids, or class names (then ``class_names``
    gives their order, default: sorted names). Raises :class:`ClassLabelError` naming the line."""
    rows: list[tuple[int, str, str]] = []
    with open(path, newline="") as f:
        for lineno, row in enumerate(csv.reader(f), start=1):
            if not row or not "".join(row).strip() or row[0].lstrip().startswith("#"):
                continue
            if len(row) < 2:
                raise ClassLabelError(f"{path}:{lineno}: expected 'case,label', got {row!r}")
            rows.append((lineno, row[0].strip(), row[1].strip()))
    if rows and rows[0][1].lower() in ("case", "case_id", "id", "identifier") and not rows[0][2].lstrip("-").isdigit():
        rows = rows[1:]  # header
    if not rows:
        raise ClassLabelError(f"{path}: no 'case,label' rows")
    numeric = all(v.lstrip("-").isdigit() for _, _, v in rows)
    names = [str(n) for n in class_names] if class_names else None
    if not numeric:
        if names is None:
            names = sorted({v for _, _, v in rows})
        unknown = sorted({v for _, _, v in rows if v not in names})
        if unknown:
            raise ClassLabelError(f"{path}: labels {unknown} are not in the class names {names}; pass --class-names "
                                  f"with every class, in class-id order")
    labels: dict[str, int] = {}
    for lineno, case, value in rows:
        if case in labels:
            raise ClassLabelError(f"{path}:{lineno}: case {case!r} is listed twice")
        labels[case] = int(value) if numeric else names.index(value)
    if names is None:
        names = [str(i) for i in range(max(max(labels.values()) + 1, 2))]
    return labels, names


def import_labels(csv_path: str, dataset_folder: str, class_names: Sequence[str] | None = None) -> dict:
    """Validate the CSV against the dataset's cases and write both keys into its dataset.json (atomically)."""
    json_path = os.path.join(dataset_folder, "dataset.json")
    if not os.path.isfile(json_path):
        raise ClassLabelError(f"{json_path} not found; --dataset must be an nnU-Net raw dataset folder")
    with open(json_path) as f:
        ds = json.load(f)
    labels, names = parse_labels_csv(csv_path, class_names)
    cases = case_ids_of(dataset_folder, ds)
    read_class_labels({LABELS_KEY: labels, NAMES_KEY: names}, cases, source=csv_path)  # raises on any problem
    ds[NAMES_KEY] = names
    ds[LABELS_KEY] = {c: labels[c] for c in cases}
    write_json_atomically(json_path, ds)
    # nnUNetv2_train reads the preprocessed copy of dataset.json: keep it in step when the dataset is planned already
    planned = planned_dataset_json(dataset_folder)
    if planned is not None:
        with open(planned) as f:
            pre_ds = json.load(f)
        pre_ds[NAMES_KEY], pre_ds[LABELS_KEY] = ds[NAMES_KEY], ds[LABELS_KEY]
        write_json_atomically(planned, pre_ds)
    return ds


def planned_dataset_json(dataset_folder: str) -> str | None:
    """nnU-Net's preprocessed copy of the raw dataset's dataset.json, if the dataset is planned already."""
    pre = os.environ.get("nnUNet_preprocessed")
    path = os.path.join(pre, os.path.basename(os.path.normpath(dataset_folder)), "dataset.json") if pre else None
    return path if path and os.path.isfile(path) else None


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--csv", required=True, help="CSV with rows 'case,label' (header optional)")
    parser.add_argument("--dataset", required=True, help="nnU-Net raw dataset folder (DatasetXXX_Name)")
    parser.add_argument("--class-names", nargs="+", help="class names in class-id order (default: the sorted names "
                                                         "in the CSV, or 0..K-1 for integer labels)")


def run(args: argparse.Namespace) -> int:
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            ds = import_labels(args.csv, args.dataset, args.class_names)
        for w in caught:
            print(f"csm_nnunet import-labels: warning: {w.message}", file=sys.stderr)
    except (ClassLabelError, OSError) as e:
        print(f"csm_nnunet import-labels: error: {e}", file=sys.stderr)
        return 1
    counts = {n: sum(v == i for v in ds[LABELS_KEY].values()) for i, n in enumerate(ds[NAMES_KEY])}
    planned = planned_dataset_json(args.dataset)
    also = f" and {planned}" if planned else ""
    print(f"wrote {len(ds[LABELS_KEY])} class labels ({', '.join(f'{n}: {k}' for n, k in counts.items())}) to "
          f"{os.path.join(args.dataset, 'dataset.json')}{also}")
    return 0
