"""``fashion tag``: tag a whole catalogue into Parquet, resumable, with three engines and Ray Data.

- ``inputs``: what to tag (a folder of images, or a CSV / Parquet manifest with ids, paths and titles);
- ``columns``: the output's columns, derived from the model's ``metadata.json``, and the title hook;
- ``engines``: one ``Engine`` per way of reaching the model (``--local``, ``--triton``, ``--gateway``);
- ``store``: the output folder (Parquet parts written atomically, a state file; resume);
- ``run``: the job (decode in parallel with inference, progress, summary); ``ray_data``: the same job as a
  Ray Data pipeline; ``bench``: what it costs per image and per million.

The run path (``run``, ``engines``, ``store``) imports no torch; only ``bench`` reaches ``training`` (for
the ``fashion predict`` row) and ``orchestration`` (to start the stack it measures).
"""
