"""alerting beyond one threshold: debounce, hysteresis, silences, reminders, digests

The columns of DESIGN.md section 6, whose defaults keep the behaviour of before:
for_checks 1, no recovery value (recovery at the threshold), no repeat, no digest.

What the system writes changes with them:
- trigger_checks.recovery: the recovery value a check used, beside its threshold;
- trigger_states.streak: consecutive PROBLEM checks (counted up to for_checks); status
  and since are NULL while a new pair's first PROBLEM checks have not decided anything;
- trigger_events.source_event_id: the trigger.checked message whose handling recorded
  the event, so a redelivery of that message publishes it again whatever check the
  event is recorded under (a late check may decide a change at another check);
- operation_runs: `repeat` (0 for the first run of an operation for an event, 1, 2 ...
  for reminders), `silence_id` (status `silenced`), `digest_id` and `message_id` (the
  email that carried the run), `measured_at` (the check that caused the run: the clock
  of reminders); digests: one email per operation, recipients and window.

Revision ID: 0007
Revises: 0006
"""
from alembic import op
import sqlalchemy as sa

revision = '0007'
down_revision = '0006'
branch_labels = None
depends_on = None

EMAIL_KINDS = "('email_affiliate', 'email_affiliate_manager', 'email_administrators')"


def upgrade() -> None:
    op.add_column('triggers', sa.Column('for_checks', sa.Integer(), server_default=sa.text('1'), nullable=False))
    op.create_check_constraint(op.f('ck_triggers_for_checks'), 'triggers', 'for_checks >= 1')
    op.add_column('triggers', sa.Column('recovery_threshold', sa.Double(), nullable=True))
    op.add_column('trigger_thresholds', sa.Column('recovery_value', sa.Double(), nullable=True))
    op.add_column('actions', sa.Column('repeat_minutes', sa.Integer(), nullable=True))
    op.create_check_constraint(op.f('ck_actions_repeat_minutes'), 'actions', 'repeat_minutes > 0')
    op.add_column('operations', sa.Column('digest_minutes', sa.Integer(), nullable=True))
    op.create_check_constraint(op.f('ck_operations_digest_minutes'), 'operations',
                               f'digest_minutes IS NULL OR (digest_minutes > 0 AND kind IN {EMAIL_KINDS})')

    op.create_table(
        'silences',
        sa.Column('id', sa.Integer(), nullable=False),
        sa.Column('trigger_id', sa.Integer(), nullable=True),
        sa.Column('offer_id', sa.Integer(), nullable=True),
        sa.Column('affiliate_id', sa.Integer(), nullable=True),
        sa.Column('starts_at', sa.DateTime(timezone=True), server_default=sa.text('now()'), nullable=False),
        sa.Column('ends_at', sa.DateTime(timezone=True), nullable=False),
        sa.Column('reason', sa.Text(), nullable=False),
        sa.Column('created_by', sa.Text(), nullable=False),
        sa.Column('created_at', sa.DateTime(timezone=True), server_default=sa.text('now()'), nullable=False),
        sa.CheckConstraint('ends_at > starts_at', name=op.f('ck_silences_window')),
        sa.ForeignKeyConstraint(['trigger_id'], ['triggers.id'], name=op.f('fk_silences_trigger_id_triggers'),
                                ondelete='CASCADE'),
        sa.PrimaryKeyConstraint('id', name=op.f('pk_silences')),
    )
    op.create_index(op.f('ix_silences_ends_at'), 'silences', ['ends_at'])

    op.add_column('trigger_checks', sa.Column('recovery', sa.Double(), nullable=True))
    op.add_column('trigger_states', sa.Column('streak', sa.Integer(), server_default=sa.text('0'), nullable=False))
    op.alter_column('trigger_states', 'status', nullable=True)
    op.alter_column('trigger_states', 'since', nullable=True)
    op.add_column('trigger_events', sa.Column('source_event_id', sa.Text(), nullable=True))
    op.create_index(op.f('ix_trigger_events_source_event_id'), 'trigger_events', ['source_event_id'])


def downgrade() -> None:
    op.drop_index(op.f('ix_trigger_events_source_event_id'), table_name='trigger_events')
    op.drop_column('trigger_events', 'source_event_id')
    op.execute("DELETE FROM trigger_states WHERE status IS NULL")  # undecided new pairs: no status to keep
    op.alter_column('trigger_states', 'since', nullable=False)
    op.alter_column('trigger_states', 'status', nullable=False)
    op.drop_column('trigger_states', 'streak')
    op.drop_column('trigger_checks', 'recovery')
    op.drop_index(op.f('ix_silences_ends_at'), table_name='silences')
    op.drop_table('silences')
    op.drop_constraint(op.f('ck_operations_digest_minutes'), 'operations', type_='check')
    op.drop_column('operations', 'digest_minutes')
    op.drop_constraint(op.f('ck_actions_repeat_minutes'), 'actions', type_='check')
    op.drop_column('actions', 'repeat_minutes')
    op.drop_column('trigger_thresholds', 'recovery_value')
    op.drop_column('triggers', 'recovery_threshold')
    op.drop_constraint(op.f('ck_triggers_for_checks'), 'triggers', type_='check')
    op.drop_column('triggers', 'for_checks')
