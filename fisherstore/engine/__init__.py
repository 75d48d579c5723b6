"""The engine under a store: state in RAM, the memory plan, steps, commits, recovery and reads.

Nothing here is imported by users directly (the facade, :class:`fisherstore.store.FisherStore`,
is the way in), except :class:`~.options.StoreOptions` and :class:`~.dist.RankGroup`,
which :mod:`fisherstore` re-exports. Every module uses the others' public names only.

==========================  ==============================================================
module                      job
==========================  ==============================================================
*state*
:mod:`.options`             every option of an open store, validated once
:mod:`.catalog`             tasks and parameters in RAM, committed and not yet committed
:mod:`.dist`                rank groups over ``torch.distributed``, and every collective
*memory*
:mod:`.memory`              the memory plan, which parameters stay resident, the heap
:mod:`.staging`             squared gradients from a GPU into host memory, overlapped
:mod:`.iopool`              the bounded I/O pool, and read-ahead
*writing*
:mod:`.transaction`         a unit settled whole on success, discarded whole on error
:mod:`.step`                one EMA step (a subpackage: writer, fills, checks)
:mod:`.generations`         the write path: new generations, read-modify-writes, folds
:mod:`.segments`            per-sample segments: planned, written, settled
:mod:`.replay`              a multi-pass run's hold on a task
*committing*
:mod:`.commit`              the flush transaction (plan first, then I/O)
:mod:`.lock`                one writer per store
:mod:`.opening`             the lock, the root document, what an open store holds
:mod:`.recovery`            what a crashed writer left, found and removed
*reading*
:mod:`.read`                reads at the current state; the head sweep
:mod:`.verify`              every committed chunk checked, leftovers named
==========================  ==============================================================

docs/architecture.md draws the life of a step, a read, a segment, a multi-pass run and a
commit through these modules.
"""
