-- Operator grants (`enforcer keys grant`) are ledger rows of kind 'grant': why (`note`, the
-- operator's text) and who (`operator`, `uid:<n>` of the admin socket's peer, taken from the
-- kernel, not from the caller). NULL for every other row. Nullable without a default, so adding
-- them rewrites nothing.
ALTER TABLE token_transactions ADD COLUMN note text, ADD COLUMN operator text;
