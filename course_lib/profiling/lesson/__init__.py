"""What stages notebook 05 and nothing else: the module's snippets as written
(:mod:`.as_written`), the small blog service whose request is profiled (:mod:`.service`, with
its slow and fixed listing), the process py-spy records (:mod:`.workload`) and the leak
(:mod:`.leak`). The code to copy into a service is in :mod:`course_lib.profiling`.

This is lesson code that composes topics: it uses the course's cache-aside
(:mod:`course_lib.caching`) and GCRA limiter (:mod:`course_lib.rate_limiting`) as the
request path's cache and limiter; the profiling library itself imports neither.
"""
