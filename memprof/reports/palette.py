"""The colours every memprof picture uses, defined once: a category (weights, gradients, optimizer state,
activations, ...) is the same colour in Table 4's bars, the timelines and any other figure."""

from __future__ import annotations

from memprof.vocabulary import Category

# memprof.vocabulary.Category -> colour (Tableau 10)
CATEGORY_COLORS = {Category.PARAMETERS: "#4e79a7", Category.GRADIENTS: "#f28e2b", Category.OPTIMIZER_STATE: "#e15759",
                   Category.ACTIVATIONS: "#76b7b2", Category.TEMPORARIES: "#59a14f", Category.WORKSPACE: "#b07aa1",
                   Category.COMMUNICATION: "#9c755f"}
CACHE_COLOR = "#d9d9d9"  # reserved but not allocated: the caching allocator's free blocks
MEASURED_COLOR = "grey"  # a measured peak with no breakdown
BUDGET_COLOR = "crimson"  # the card's usable memory, an OOM
UNCERTAIN_COLOR = "#e08a00"  # may not fit: the prediction's band reaches past the budget


def category_label(category: str) -> str:
    """`optimizer_state` -> `optimizer state`; parameters are the model's weights."""
    return "parameters (weights)" if category == Category.PARAMETERS else category.replace("_", " ")
