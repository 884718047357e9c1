-- The span id of the accepting SMTP session, beside its trace id: later work that is its own
-- trace (a POP3 retrieval) links to this span.
ALTER TABLE messages ADD COLUMN trace_span_id text;
