"""Model sources: where a model name's network comes from, one module per source behind one protocol
(memprof.model_sources.base.ModelSource), found by memprof.model_sources.registry.

Built in: open_clip (memprof's own names and every open_clip architecture name, written bare), timm
(`timm:NAME`), torchvision (`torchvision:NAME`), hf (`hf:DIR` or `hf:ORG/NAME`, a Hugging Face config: a local
directory or the local cache) and py (`py:package.module:factory`, a user's zero-argument factory). A new source is one module (a ModelSource) and one registry line, or, from outside memprof, an entry
point in the `memprof.model_sources` group. memprof.models is the front the rest of memprof calls.
"""
