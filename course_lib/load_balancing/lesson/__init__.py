"""What stages notebook 02 and nothing else: the module's balancers as written
(:mod:`.as_written`) and the small demos around them (:mod:`.demos`). The code to copy
into a service is in :mod:`course_lib.load_balancing`.
"""
