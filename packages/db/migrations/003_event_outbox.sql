-- How far the journey (delivery_events) has been published to mail.event.* on NATS.
CREATE TABLE event_outbox (
  name     text PRIMARY KEY,
  position bigint NOT NULL DEFAULT 0
);
INSERT INTO event_outbox (name) VALUES ('nats');
