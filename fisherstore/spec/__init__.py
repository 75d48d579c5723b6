"""The format and the maths, as specs: pure functions and typed documents, no I/O.

Everything a reader of a store must agree on lives here, below every module that does
I/O: what the keys and documents are, how heads map to indices, how the EMA is read
out. docs/format.md is the same spec in prose.

==========================  ==============================================================
module                      job
==========================  ==============================================================
:mod:`.format`              names, keys and the root document (:class:`~.format.StoreDoc`)
:mod:`.manifest`            a task manifest, the commit point (:class:`~.manifest.TaskManifest`)
:mod:`.fields`              how a document's fields are validated, and the error they raise
:mod:`.codecs`              the codec chain of a store's arrays (:class:`~.codecs.CodecSpec`)
:mod:`.ema`                 the exact EMA maths: decay, bias correction, folds
:mod:`.layout`              head geometry (:class:`~.layout.ParamLayout`), chunk shapes
:mod:`.layers`              layer keys of parameter names (one stack or several)
:mod:`.regions`             regions and chunk grids
:mod:`.indexing`            a basic index as a plan: the region to read, then flips and squeezes
:mod:`.samples`             per-sample gradients: dtypes, ``C_i = g_i²/T_i``, ``g_i/T_i``
==========================  ==============================================================
"""
