"""The seed paper's claims, as data: what Table 4 (and the overhead report) set our figures beside."""

# The seed paper's Table 4 claims (Kumar et al., ICLR 2024, section 5): AdamW's extra memory over each
# freeze-embed SGD variant, measured with W&B system metrics (NVML) on a 12 GB Titan-X at micro-batch 1.
PAPER_CLAIMS = (
    ("vit-b-16", "sgd-fe", 16, "AdamW uses 16% more than SGD (freeze-embed)"),
    ("vit-b-16", "sgd-fe-nomom", 36, "AdamW uses 36% more than SGD (freeze-embed, no momentum)"),
    ("vit-l-14", "sgd-fe", 18, "AdamW uses 18% more than SGD (freeze-embed)"),
    ("vit-l-14", "sgd-fe-nomom", 48, "AdamW uses 48% more than SGD (freeze-embed, no momentum)"),
    ("vit-h-14", "sgd-fe", 20, "AdamW runs out of memory at 12 GB, SGD (freeze-embed) runs: gain at least 20%"),
    ("vit-h-14", "sgd-fe-nomom", 60, "AdamW runs out of memory at 12 GB, SGD (freeze-embed, no momentum) runs: "
                                     "gain at least 60%"),
)

CLAIM_TOLERANCE_POINTS = 10  # a percentage within this many points of the paper's agrees
