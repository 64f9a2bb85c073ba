-- Example trigger definitions: the original system's checks, thresholds of every
-- scope, operations of every kind and two actions.
-- Load into a migrated database:  psql "$DATABASE_URL_PSQL" -v ON_ERROR_STOP=1 -f seeds/example.sql
-- Safe to load twice: every row is keyed by its unique name.

BEGIN;

-- Triggers: {metric value} {operator} {threshold} means PROBLEM.
INSERT INTO triggers (name, metric_key, operator, threshold, active) VALUES
    ('min CR',            'cr',               'lt', 0.005, true),   -- conversion rate below 0.5 %
    ('max CR',            'cr',               'gt', 0.30,  true),   -- conversion rate above 30 %: likely fraud
    ('negative pacc',     'pacc',             'lt', 0,     true),   -- profit after click cost below zero
    ('goal ratio',        'gtr',              'lt', 0.05,  true),   -- too few goal conversions per default one
    ('cap fill',          'cap_fill',         'ge', 1.0,   true),   -- daily cap reached or blown through
    ('clicks, zero conv', 'clicks_zero_conv', 'ge', 500,   true)    -- many clicks, not one conversion
ON CONFLICT (name) DO NOTHING;

-- Thresholds more specific than the general one (most specific wins:
-- offer_affiliate > affiliate > offer > offer_category > general).
INSERT INTO trigger_thresholds (trigger_id, scope, category_id, offer_id, affiliate_id, value)
SELECT t.id, v.scope, v.category_id, v.offer_id, v.affiliate_id, v.value
FROM (VALUES
    ('min CR',   'offer_category',  3,    NULL, NULL, 0.002),   -- category 3 converts slowly
    ('min CR',   'offer',           NULL, 2,    NULL, 0.01),
    ('min CR',   'affiliate',       NULL, NULL, 5,    0.003),
    ('min CR',   'offer_affiliate', NULL, 2,    5,    0.02),
    ('max CR',   'offer',           NULL, 4,    NULL, 0.5),
    ('cap fill', 'affiliate',       NULL, NULL, 7,    1.2)      -- a trusted affiliate may overshoot
) AS v(trigger_name, scope, category_id, offer_id, affiliate_id, value)
JOIN triggers t ON t.name = v.trigger_name
ON CONFLICT ON CONSTRAINT uq_trigger_thresholds_target DO NOTHING;

-- Operations. subject/body NULL = the built-in default of the kind.
INSERT INTO operations (name, kind, subject, body) VALUES
    ('mail affiliate',         'email_affiliate',
        'Offer {offer-name}: {trigger-name} is {status}',
        '<p>Your traffic on offer {offer-name} (#{offer-id}) triggered <b>{trigger-name}</b>: '
        '{metric} = {value}, threshold {threshold}, measured at {measured-at}.</p>'),
    ('mail account manager',   'email_affiliate_manager', NULL, NULL),
    ('mail administrators',    'email_administrators',
        '[KPI] {trigger-name} {previous-status} -> {status}: offer {offer-id}, affiliate {affiliate-id}', NULL),
    ('approve affiliate',      'approve_affiliate', NULL, NULL),
    ('reject affiliate',       'reject_affiliate',  NULL, NULL)
ON CONFLICT (name) DO NOTHING;

INSERT INTO administrators (email) VALUES ('ops@network.example') ON CONFLICT (email) DO NOTHING;

INSERT INTO actions (name, active) VALUES
    ('warn on low CR', true),
    ('reject fraud',   true)
ON CONFLICT (name) DO NOTHING;

-- 'warn on low CR': when min CR goes to PROBLEM, mail the affiliate and their manager.
-- 'reject fraud': when max CR is in PROBLEM and the conversion cap is blown through too,
-- reject the affiliate on the offer and tell the administrators.
INSERT INTO action_conditions (action_id, trigger_id, trigger_status)
SELECT a.id, t.id, v.status
FROM (VALUES
    ('warn on low CR', 'min CR',            'PROBLEM'),
    ('reject fraud',   'max CR',            'PROBLEM'),
    ('reject fraud',   'cap fill',          'PROBLEM')
) AS v(action_name, trigger_name, status)
JOIN actions a ON a.name = v.action_name
JOIN triggers t ON t.name = v.trigger_name
WHERE NOT EXISTS (
    SELECT 1 FROM action_conditions c WHERE c.action_id = a.id AND c.trigger_id = t.id AND c.trigger_status = v.status
);

INSERT INTO action_operations (action_id, operation_id)
SELECT a.id, o.id
FROM (VALUES
    ('warn on low CR', 'mail affiliate'),
    ('warn on low CR', 'mail account manager'),
    ('reject fraud',   'reject affiliate'),
    ('reject fraud',   'mail administrators')
) AS v(action_name, operation_name)
JOIN actions a ON a.name = v.action_name
JOIN operations o ON o.name = v.operation_name
ON CONFLICT DO NOTHING;

COMMIT;
