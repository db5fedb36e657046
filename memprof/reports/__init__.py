"""What users read, rendered from records only: Table 4 (`table4`, with the paper's claims and `overhead`),
the planner's tables (`planner`), memory timelines (`timeline`), allocator snapshots (`snapshot`) and the
HTML report (`html`)."""
