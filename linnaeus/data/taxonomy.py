"""The label space and the taxonomy tree over it.

Each task (rank) has its own class indices; index ``NULL_INDEX`` (0) of every task is the explicit
"unknown at this rank" class, and real taxa take indices 1..C-1, sorted by taxon id. Code must use
``Taxonomy.null_index`` rather than assume what 0 means. Parents are stored as index arrays into
the next coarser task, so ancestors and tree distances are vectorised lookups.
"""

from __future__ import annotations

import json
from collections import Counter, defaultdict
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from linnaeus.data.labels import DatasetError, LabelTable, level_of

NULL_INDEX = 0
NULL_NAME = "<unknown>"


def lca_distance_between(chain_a: torch.Tensor, chain_b: torch.Tensor, null_index: int) -> torch.Tensor:
    """The one definition of tree distance: ``2 * (L - depth(LCA))`` between ancestor chains.

    ``chain_a`` (..., L) and ``chain_b`` (..., L) broadcast against each other (row: a class's ancestor
    at every rank, coarse to fine, the class itself last). The LCA is the deepest rank whose ancestors
    are equal and known; an unknown (null) ancestor is never shared. Both classes climb the same
    number of levels to it, so the distance is 0 for the class itself and ``2 * L`` when no known
    ancestor is shared. Works one rank at a time: memory is one broadcast slice, never (..., L) x C.
    """
    levels = chain_a.shape[-1]
    depth = None
    for level in range(levels):  # coarse -> fine: the deepest shared level wins
        a, b = chain_a[..., level], chain_b[..., level]
        shared = (a == b) & (a != null_index)
        level_depth = shared.to(torch.int32) * (level + 1)
        depth = level_depth if depth is None else torch.maximum(depth, level_depth)
    return 2 * (levels - depth)


@dataclass
class Conflict:
    """One inconsistency in the labels, with the rows it concerns."""

    message: str
    rows: np.ndarray


class Taxonomy:
    """Label space (per-task classes) plus the tree linking classes of adjacent tasks."""

    null_index = NULL_INDEX

    def __init__(
        self,
        task_keys: list[str],
        class_ids: list[np.ndarray],
        names: list[list[str]],
        parents: list[np.ndarray | None],
    ) -> None:
        self.task_keys = list(task_keys)
        self.levels = [level_of(k) for k in task_keys]
        self.class_ids = [np.asarray(ids, dtype=np.int64) for ids in class_ids]
        self.names = [list(n) for n in names]
        self.parents = [None if p is None else np.asarray(p, dtype=np.int64) for p in parents]
        self._index = [{int(t): i for i, t in enumerate(ids)} for ids in self.class_ids]
        self.ancestors = self._build_ancestors()
        self._ancestor_tensors: dict[tuple[int, str], torch.Tensor] = {}

    # ------------------------------------------------------------------ structure
    @property
    def num_tasks(self) -> int:
        return len(self.task_keys)

    @property
    def num_classes(self) -> list[int]:
        """Classes per task, the null class included."""
        return [len(ids) for ids in self.class_ids]

    def _build_ancestors(self) -> list[np.ndarray]:
        """Per task t, an array (C_t, t + 1): the class index at every task 0..t (column t is self)."""
        out = [np.arange(len(self.class_ids[0]), dtype=np.int64)[:, None]]
        for t in range(1, self.num_tasks):
            own = np.arange(len(self.class_ids[t]), dtype=np.int64)[:, None]
            out.append(np.concatenate([out[t - 1][self.parents[t]], own], axis=1))
        return out

    def encode(self, taxa: np.ndarray) -> np.ndarray:
        """Taxon ids (N, T) -> class indices (N, T); unknown ids (0) map to the null index."""
        out = np.empty(taxa.shape, dtype=np.int64)
        for t in range(self.num_tasks):
            ids = self.class_ids[t]
            pos = np.searchsorted(ids, taxa[:, t])
            pos = np.clip(pos, 0, len(ids) - 1)
            found = ids[pos] == taxa[:, t]
            if not found.all():
                bad = sorted(set(taxa[~found, t].tolist()))[:5]
                raise DatasetError(f"taxon ids {bad} at {self.task_keys[t]} are not in the label space")
            out[:, t] = pos
        return out

    def ancestors_tensor(self, task: int, device: torch.device | str) -> torch.Tensor:
        key = (task, str(device))
        if key not in self._ancestor_tensors:
            self._ancestor_tensors[key] = torch.as_tensor(self.ancestors[task], device=device)
        return self._ancestor_tensors[key]

    def distance(self, task: int, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        """Tree distance between classes ``a`` and ``b`` of one task, through their lowest common ancestor:
        ``2 * (task + 1 - depth(LCA))``, 0 for equal classes and ``2 * (task + 1)`` when they share no
        known ancestor. The same definition the losses use (``lca_distance_between``)."""
        anc = self.ancestors_tensor(task, a.device)
        return lca_distance_between(anc[a], anc[b], self.null_index)

    # ------------------------------------------------------------------ (de)serialisation
    def to_dict(self) -> dict:
        return {
            "task_keys": self.task_keys,
            "levels": self.levels,
            "null_index": self.null_index,
            "tasks": [
                {
                    "task_key": key,
                    "taxon_ids": self.class_ids[t].tolist(),
                    "names": self.names[t],
                    "parents": None if self.parents[t] is None else self.parents[t].tolist(),
                }
                for t, key in enumerate(self.task_keys)
            ],
        }

    @classmethod
    def from_dict(cls, state: dict) -> Taxonomy:
        tasks = state["tasks"]
        return cls(
            state["task_keys"],
            [np.asarray(t["taxon_ids"]) for t in tasks],
            [t["names"] for t in tasks],
            [None if t["parents"] is None else np.asarray(t["parents"]) for t in tasks],
        )

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=1))

    @classmethod
    def load(cls, path: str | Path) -> Taxonomy:
        return cls.from_dict(json.loads(Path(path).read_text()))

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Taxonomy) and self.to_dict() == other.to_dict()

    def summary(self) -> str:
        return ", ".join(f"{k}: {n - 1} classes" for k, n in zip(self.task_keys, self.num_classes))


# ---------------------------------------------------------------------- building from labels
def _parents_from_taxonomy_group(table: LabelTable, conflicts: list[Conflict]) -> list[dict[int, int]]:
    """child id -> parent id at the next coarser task, walking the stored tree across skipped ranks."""
    group = table.taxonomy
    parent_of = dict(zip(group["taxon_id"].tolist(), group["parent_id"].tolist()))
    level_of_id = dict(zip(group["taxon_id"].tolist(), group["level"].tolist()))
    levels = [level_of(k) for k in table.task_keys]
    maps: list[dict[int, int]] = [{}]
    for t in range(1, len(levels)):
        mapping = {}
        column = table.taxa[:, t]
        for child in np.unique(column[column > 0]).tolist():
            rows = np.flatnonzero(column == child)
            if child not in parent_of:
                conflicts.append(
                    Conflict(
                        f"taxon {child} ({table.task_keys[t]}) is missing from the 'taxonomy' group", rows
                    )
                )
                continue
            node, steps = parent_of[child], 0
            while node != 0 and node in level_of_id and level_of_id[node] < levels[t - 1] and steps < 100:
                node, steps = parent_of.get(node, 0), steps + 1
            if steps >= 100:
                conflicts.append(Conflict(f"the taxonomy has a cycle above taxon {child}", rows))
            elif node == 0 or node not in level_of_id:
                conflicts.append(
                    Conflict(
                        f"taxon {child} ({table.task_keys[t]}) has an unknown parent "
                        f"(parent id {parent_of[child]} is not in the taxonomy group or has no {table.task_keys[t - 1]} ancestor)",
                        rows,
                    )
                )
            elif level_of_id[node] != levels[t - 1]:
                conflicts.append(
                    Conflict(
                        f"taxon {child} ({table.task_keys[t]}) has no ancestor at rank {table.task_keys[t - 1]} "
                        f"in the taxonomy group (the chain jumps to level {level_of_id[node]})",
                        rows,
                    )
                )
            else:
                mapping[child] = node
        maps.append(mapping)
    return maps


def _parents_from_rows(table: LabelTable, conflicts: list[Conflict]) -> list[dict[int, int]]:
    """child id -> parent id from co-occurrence in the rows; a child with two parents is a conflict."""
    maps: list[dict[int, int]] = [{}]
    for t in range(1, table.taxa.shape[1]):
        child, parent = table.taxa[:, t], table.taxa[:, t - 1]
        both = (child > 0) & (parent > 0)
        seen: dict[int, Counter] = defaultdict(Counter)
        for c, p in zip(child[both].tolist(), parent[both].tolist()):
            seen[c][p] += 1
        mapping = {}
        for c, counts in seen.items():
            (majority, _), *others = counts.most_common()
            mapping[c] = majority
            if others:
                rows = np.flatnonzero((child == c) & (parent > 0) & (parent != majority))
                listed = ", ".join(f"{p} ({k} rows)" for p, k in counts.most_common())
                conflicts.append(
                    Conflict(
                        f"taxon {c} ({table.task_keys[t]}) has several parents at {table.task_keys[t - 1]}: {listed}",
                        rows,
                    )
                )
        maps.append(mapping)
    return maps


def _reject_empty_ranks(table: LabelTable) -> None:
    """Raise if a rank has no known label in any row: no classifier can learn it."""
    empty = [key for t, key in enumerate(table.task_keys) if not (table.taxa[:, t] > 0).any()]
    if empty:
        others = [key for key in table.task_keys if key not in empty]
        fix = f"leave it out with data.task_keys=[{','.join(others)}]" if others else "rebuild the labels"
        raise DatasetError(
            f"{table.path}: rank(s) {', '.join(empty)} have no known label in any row (every id is 0, unknown); "
            f"a classifier cannot learn them: {fix}"
        )


def _check_rows_against_taxonomy_group(
    table: LabelTable, parent_maps: list[dict[int, int]], conflicts: list[Conflict]
) -> None:
    """Add a conflict for every taxon whose rows name a different parent than the taxonomy group."""
    for t in range(1, len(parent_maps)):
        child, parent = table.taxa[:, t], table.taxa[:, t - 1]
        expected = np.array([parent_maps[t].get(c, -1) for c in child.tolist()], dtype=np.int64)
        wrong = (child > 0) & (parent > 0) & (expected > 0) & (parent != expected)
        for c in np.unique(child[wrong]).tolist():
            rows = np.flatnonzero(wrong & (child == c))
            conflicts.append(
                Conflict(
                    f"taxon {c} ({table.task_keys[t]}) is listed under {sorted(set(parent[rows].tolist()))} "
                    f"in the rows but under {parent_maps[t][c]} in the taxonomy group",
                    rows,
                )
            )


def _fill_unknown_parents(
    table: LabelTable, parent_maps: list[dict[int, int]], conflicts: list[Conflict]
) -> tuple[np.ndarray, int]:
    """The taxa with unknown parents filled in from the tree, and how many; one it cannot fill is a conflict."""
    taxa = table.taxa.copy()
    filled = 0
    for t in range(taxa.shape[1] - 1, 0, -1):  # fine -> coarse, so a filled parent can fill its own parent
        orphan = (taxa[:, t] > 0) & (taxa[:, t - 1] == 0)
        for row in np.flatnonzero(orphan):
            parent = parent_maps[t].get(int(taxa[row, t]))
            if parent is not None:
                taxa[row, t - 1] = parent
                filled += 1
        still = np.flatnonzero((taxa[:, t] > 0) & (taxa[:, t - 1] == 0))
        for c in np.unique(taxa[still, t]).tolist():
            rows = still[taxa[still, t] == c]
            conflicts.append(
                Conflict(
                    f"taxon {c} ({table.task_keys[t]}) sits below an unknown parent at {table.task_keys[t - 1]} "
                    "and no row or taxonomy entry says what the parent is",
                    rows,
                )
            )
    return taxa, filled


def _conflicts_error(table: LabelTable, conflicts: list[Conflict], bad_rows: np.ndarray) -> DatasetError:
    """The error listing the first conflicts, with example rows, and how to train anyway."""
    shown = "\n".join(
        f"  - {c.message}; rows e.g. {table.identifiers[c.rows[:3]].tolist()}" for c in conflicts[:10]
    )
    more = f"\n  ... and {len(conflicts) - 10} more" if len(conflicts) > 10 else ""
    return DatasetError(
        f"{table.path}: {len(conflicts)} taxonomy conflict(s) in {len(bad_rows)} row(s):\n{shown}{more}\n"
        f"Fix the labels, or set data.on_conflict=drop to train without these {len(bad_rows)} rows."
    )


def _label_space(
    table: LabelTable, parent_maps: list[dict[int, int]]
) -> tuple[list[np.ndarray], list[list[str]], list[np.ndarray | None]]:
    """Per task: the class taxon ids (null first), their names, and each class's parent index."""
    names_of = {}
    if table.taxonomy is not None:
        names_of = dict(zip(table.taxonomy["taxon_id"].tolist(), table.taxonomy["name"].tolist()))
    class_ids, names, parents = [], [], []
    for t in range(table.taxa.shape[1]):
        ids = np.concatenate([[0], np.unique(table.taxa[:, t][table.taxa[:, t] > 0])]).astype(np.int64)
        class_ids.append(ids)
        names.append([NULL_NAME] + [str(names_of.get(int(i), i)) for i in ids[1:]])
        if t == 0:
            parents.append(None)
            continue
        coarse_index = {int(c): i for i, c in enumerate(class_ids[t - 1])}
        parent = np.zeros(len(ids), dtype=np.int64)
        for i, c in enumerate(ids[1:].tolist(), start=1):
            parent[i] = coarse_index[parent_maps[t][c]] if c in parent_maps[t] else NULL_INDEX
        parents.append(parent)
    return class_ids, names, parents


def build_taxonomy(table: LabelTable, on_conflict: str = "error") -> tuple[Taxonomy, LabelTable, dict]:
    """Derive the label space and tree from a label table, repairing or rejecting inconsistent rows.

    Rows with a known taxon under an unknown parent get the parent filled in when the tree knows
    it. Rows that contradict the tree (two parents, a parent absent from the taxonomy group, an
    unknown parent that cannot be filled in) are conflicts: ``on_conflict="error"`` raises a
    ``DatasetError`` listing them, ``"drop"`` removes those rows.

    Returns the taxonomy, the (possibly repaired and filtered) table, and a report dict.
    """
    if on_conflict not in ("error", "drop"):
        raise ValueError(f"data.on_conflict must be 'error' or 'drop', got {on_conflict!r}")
    _reject_empty_ranks(table)
    conflicts: list[Conflict] = []
    if table.taxonomy is not None:
        parent_maps = _parents_from_taxonomy_group(table, conflicts)
        _check_rows_against_taxonomy_group(table, parent_maps, conflicts)
    else:
        parent_maps = _parents_from_rows(table, conflicts)
    taxa, filled = _fill_unknown_parents(table, parent_maps, conflicts)

    bad_rows = np.unique(np.concatenate([c.rows for c in conflicts])) if conflicts else np.empty(0, np.int64)
    if conflicts and on_conflict == "error":
        raise _conflicts_error(table, conflicts, bad_rows)
    keep = np.ones(len(table), dtype=bool)
    keep[bad_rows] = False
    table = table.subset(keep)
    table.taxa = taxa[keep]

    class_ids, names, parents = _label_space(table, parent_maps)
    report = {
        "rows": int(len(keep)),
        "dropped_rows": int((~keep).sum()),
        "filled_parents": int(filled),
        "conflicts": [{"message": c.message, "rows": int(len(c.rows))} for c in conflicts],
    }
    return Taxonomy(table.task_keys, class_ids, names, parents), table, report
