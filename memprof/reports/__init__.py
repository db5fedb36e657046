"""What users read, rendered from records: Table 4 (`table4`, the paper's claims in `paper`, `overhead`),
the planner's tables (`planner`), memory timelines (`timeline`), allocator snapshots (`snapshot`) and the
HTML report (`html`)."""
