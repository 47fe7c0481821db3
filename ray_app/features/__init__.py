"""Features that are computed from an event log rather than read from one row: the one definition
(``behaviour``) and the online store that serves it (``online_store``)."""
