"""What stages notebook 06 and nothing else: the feed service with its switches
(:mod:`.app`), the open-loop trace player (:mod:`.load`), the stack it runs on and its
admin (:mod:`.rig`, with the Redis reaper :mod:`.reaper`), the ladder runner (:mod:`.ladder`)
and the fault injector (:mod:`.faults`).
"""
