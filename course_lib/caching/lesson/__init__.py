"""What stages notebook 01 and nothing else: the module's code as written (:mod:`.as_written`),
the demos behind its charts (:mod:`.demos`) and its staged races (:mod:`.races`). The code
to copy into a service is in :mod:`course_lib.caching`.
"""
