"""What stages notebook 01 and nothing else: the module's code as written (:mod:`.as_written`),
the demos behind its charts (:mod:`.demos`), its staged races (:mod:`.races`), the
module's write-behind on RQ workers (:mod:`.rq_write_behind`) and the cache on a local
Redis Cluster (:mod:`.cluster`). The code
to copy into a service is in :mod:`course_lib.caching`.
"""
