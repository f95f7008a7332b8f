-- The start of what the receiver answered to a failed attempt (at most 512 bytes).
ALTER TABLE delivery_attempts ADD COLUMN response text;
