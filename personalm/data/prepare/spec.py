"""What shapes a prepared split's rows (``RowSpec``: all of it part of the key) and which columns it holds."""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Optional

from personalm.data.compred import PROMPT_SPLIT

# what the text pass reads of each kind of split
TEXT_COLUMNS = {"preference": ["domain", "post_id", "title", "history", "human_ref_A", "human_ref_B", "labels"],
                "prompts": ["domain", "post_id", "title", "history"]}


@dataclass(frozen=True)
class RowSpec:
    """What shapes a prepared split's rows (all of it part of the key)."""

    split: str
    rows: str  # "sft" | "preference" (prompts: "prompts")
    mode: str  # the prompt's community: "true" | "none" | "random"
    variants: tuple  # extra prompts scored on the same pairs: ("none", "random") or ()
    max_length: int
    max_prompt_length: Optional[int]
    seed: Optional[int]  # None where no draw acts on the split (no cap, no subsample, no random community)
    min_score_ratio: Optional[float] = None
    max_pairs_per_post: Optional[int] = None
    max_pairs: Optional[int] = None  # the seeded cap (max_train_pairs or max_eval_pairs)
    cap_floor: Optional[int] = None  # the cap drawn per community with this floor (None: drawn over all pairs)

    @classmethod
    def of(cls, split: str, hp) -> "RowSpec":
        """From the DataModule's settings, keeping only those that act on ``split`` (so a change to a training
        setting does not invalidate the evaluation splits)."""
        mode = "random" if hp["random_community"] else ("true" if hp["contextualize"] else "none")
        common = dict(split=split, mode=mode, max_length=hp["max_length"], max_prompt_length=hp["max_prompt_length"],
                      seed=hp["seed"], cap_floor=hp.get("cap_floor"))
        if split == PROMPT_SPLIT:
            spec = cls(rows="prompts", variants=(), **common)
        else:
            variants = ("none", "random") if (hp["rows"] == "preference" and hp["conditioning_variants"]
                                              and split != "train_pref") else ()
            if split == "train_pref":
                spec = cls(rows=hp["rows"], variants=variants, min_score_ratio=hp["min_score_ratio"],
                           max_pairs_per_post=hp["max_pairs_per_post"], max_pairs=hp["max_train_pairs"], **common)
            else:
                spec = cls(rows=hp["rows"], variants=variants, max_pairs=hp["max_eval_pairs"], **common)
        drawn = spec.mode == "random" or "random" in spec.variants or spec.max_pairs is not None or (
            spec.split == "train_pref" and spec.max_pairs_per_post is not None)
        if spec.max_pairs is None:
            spec = replace(spec, cap_floor=None)  # no cap: its floor acts on nothing
        return spec if drawn else replace(spec, seed=None)  # a seed sweep shares the splits no draw acts on

    @property
    def columns(self) -> list[str]:
        """The columns the prepared split holds (``index`` is added when it is opened)."""
        if self.rows == "prompts":
            return ["community", "post_id", "prompt_community", "title", "post", "prompt_ids"]
        ids = ["prompt_ids", "chosen_ids"] + (["rejected_ids"] if self.rows == "preference" else [])
        return ["community", "post_id", *ids, *(f"{v}_prompt_ids" for v in self.variants)]

