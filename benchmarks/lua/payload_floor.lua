-- The payload floor: an EVALSHA carrying a limiter's arguments and answering a reply of the
-- same shape ({allowed, remaining, retry_after_us, reset_after_us}), doing nothing else.
-- Its time minus its server time is what one scripted decision costs before any work.
return {1, 999999999, 0, 59999999}
