"""Streaming data: image folders packed into Parquet shards, read a window at a time.

Why: the in-memory path (``data/``) decodes the whole dataset into arrays that travel through
the object store, so a search is capped by one node's memory. Shards are read a window of a
few thousand images at a time, on any node, from local disk or object storage (``s3://`` via
pyarrow's file systems), decoded either in the trial itself or in Ray Data's workers.

Rule: ``stream/`` imports only ``data/``, ``config``, ``files`` and ``errors`` from casd_ray;
besides ``search/`` it is the only package that imports ray (Ray Data, in
:mod:`~casd_ray.stream.raydata` only). :mod:`~casd_ray.stream.shards` writes and verifies
shards; :mod:`~casd_ray.stream.decode` turns stored bytes into uint8 arrays;
:mod:`~casd_ray.stream.images` is the streamed split every trial reads through (the same
interface as in-memory arrays, see :class:`casd_ray.data.batches.Streamed`);
:mod:`~casd_ray.stream.load` turns a shard folder into ``DataSplits``.
"""
