"""The capstone (notebook 06): one service composed of every topic's library parts.

It has no library code of its own: everything here is lesson code (:mod:`.lesson`), which may
import several topics because composing them is its point; no topic imports it.
"""
