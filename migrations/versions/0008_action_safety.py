"""actions: silenced, held and reminder runs, digests, protected affiliates, evaluations

DESIGN.md sections 6 and 7, on the action side:
- affiliates.protected: a local column (a reference refresh never writes it); a reject
  never runs for a protected affiliate;
- operation_runs: the statuses `silenced`, `held` (over KPI_MAX_REJECTS_PER_HOUR) and
  `discarded`; `repeat` (0 for the first run of an operation for an event, then one per
  reminder: the unique key grows by it); `measured_at` (the check that caused the run:
  the clock of reminders); `silence_id`; `digest_id` and `message_id` (the email that
  carried the run); `cap_granted_at` (a reject allowed under the cap, counted while it
  runs); `decided_by` / `decided_at` (who released or discarded a held run);
- digests: one email per operation, recipients and window;
- reject_cap_alerts: the first hold of each hour, so the administrators hear once;
- action_evaluations: for each trigger event, each action it was evaluated for, whether
  it fired and why not (what `kpi explain` shows).

Revision ID: 0008
Revises: 0007
"""
from alembic import op
import sqlalchemy as sa

revision = '0008'
down_revision = '0007'
branch_labels = None
depends_on = None

OLD_STATUSES = "('pending', 'succeeded', 'failed', 'skipped')"
NEW_STATUSES = "('pending', 'succeeded', 'failed', 'skipped', 'silenced', 'held', 'discarded')"
TZ = sa.DateTime(timezone=True)


def upgrade() -> None:
    op.add_column('affiliates', sa.Column('protected', sa.Boolean(), server_default=sa.text('false'),
                                          nullable=False))

    op.drop_constraint(op.f('ck_operation_runs_status'), 'operation_runs', type_='check')
    op.create_check_constraint(op.f('ck_operation_runs_status'), 'operation_runs', f"status IN {NEW_STATUSES}")
    op.add_column('operation_runs', sa.Column('repeat', sa.Integer(), server_default=sa.text('0'), nullable=False))
    op.drop_constraint('uq_operation_runs_trigger_event_id_action_id_operation_id', 'operation_runs', type_='unique')
    op.create_unique_constraint('uq_operation_runs_run', 'operation_runs',
                                ['trigger_event_id', 'action_id', 'operation_id', 'repeat'])
    op.add_column('operation_runs', sa.Column('measured_at', TZ, nullable=True))
    op.add_column('operation_runs', sa.Column('silence_id', sa.Integer(), nullable=True))
    op.add_column('operation_runs', sa.Column('digest_id', sa.BigInteger(), nullable=True))
    op.add_column('operation_runs', sa.Column('message_id', sa.Text(), nullable=True))
    op.add_column('operation_runs', sa.Column('cap_granted_at', TZ, nullable=True))
    op.add_column('operation_runs', sa.Column('decided_by', sa.Text(), nullable=True))
    op.add_column('operation_runs', sa.Column('decided_at', TZ, nullable=True))
    op.execute("UPDATE operation_runs r SET measured_at = e.measured_at FROM trigger_events e "
               "WHERE e.id = r.trigger_event_id")
    op.create_index('ix_operation_runs_held', 'operation_runs', ['id'], postgresql_where=sa.text("status = 'held'"))
    op.create_index('ix_operation_runs_rejects', 'operation_runs', ['finished_at'],
                    postgresql_where=sa.text("kind = 'reject_affiliate'"))
    op.create_index(op.f('ix_operation_runs_digest_id'), 'operation_runs', ['digest_id'])

    op.create_table(
        'digests',
        sa.Column('id', sa.BigInteger(), nullable=False),
        sa.Column('operation_id', sa.Integer(), nullable=False),
        sa.Column('recipients', sa.Text(), nullable=False),
        sa.Column('opened_at', TZ, nullable=False),
        sa.Column('closes_at', TZ, nullable=False),
        sa.Column('status', sa.Text(), server_default=sa.text("'open'"), nullable=False),
        sa.Column('attempts', sa.Integer(), server_default=sa.text('0'), nullable=False),
        sa.Column('message_id', sa.Text(), nullable=True),
        sa.Column('sent_at', TZ, nullable=True),
        sa.Column('detail', sa.Text(), nullable=True),
        sa.CheckConstraint("status IN ('open', 'sent', 'failed')", name=op.f('ck_digests_status')),
        sa.ForeignKeyConstraint(['operation_id'], ['operations.id'], name=op.f('fk_digests_operation_id_operations'),
                                ondelete='CASCADE'),
        sa.PrimaryKeyConstraint('id', name=op.f('pk_digests')),
    )
    op.create_index('ix_digests_open', 'digests', ['closes_at'], postgresql_where=sa.text("status = 'open'"))

    op.create_table(
        'reject_cap_alerts',
        sa.Column('hour', TZ, nullable=False),
        sa.Column('held_run_id', sa.BigInteger(), nullable=False),
        sa.Column('created_at', TZ, server_default=sa.text('now()'), nullable=False),
        sa.Column('sent_at', TZ, nullable=True),
        sa.Column('detail', sa.Text(), nullable=True),
        sa.PrimaryKeyConstraint('hour', name=op.f('pk_reject_cap_alerts')),
    )

    op.create_table(
        'action_evaluations',
        sa.Column('trigger_event_id', sa.BigInteger(), nullable=False),
        sa.Column('action_id', sa.Integer(), nullable=False),
        sa.Column('fired', sa.Boolean(), nullable=False),
        sa.Column('reason', sa.Text(), nullable=False),
        sa.Column('episode', sa.Text(), nullable=True),
        sa.Column('created_at', TZ, server_default=sa.text('now()'), nullable=False),
        sa.ForeignKeyConstraint(['trigger_event_id'], ['trigger_events.id'],
                                name=op.f('fk_action_evaluations_trigger_event_id_trigger_events'), ondelete='CASCADE'),
        sa.ForeignKeyConstraint(['action_id'], ['actions.id'], name=op.f('fk_action_evaluations_action_id_actions'),
                                ondelete='CASCADE'),
        sa.PrimaryKeyConstraint('trigger_event_id', 'action_id', name=op.f('pk_action_evaluations')),
    )


def downgrade() -> None:
    op.drop_table('action_evaluations')
    op.drop_table('reject_cap_alerts')
    op.drop_index('ix_digests_open', table_name='digests')
    op.drop_table('digests')
    op.drop_index(op.f('ix_operation_runs_digest_id'), table_name='operation_runs')
    op.drop_index('ix_operation_runs_rejects', table_name='operation_runs')
    op.drop_index('ix_operation_runs_held', table_name='operation_runs')
    for column in ('decided_at', 'decided_by', 'cap_granted_at', 'message_id', 'digest_id', 'silence_id',
                   'measured_at'):
        op.drop_column('operation_runs', column)
    op.execute("DELETE FROM operation_runs WHERE repeat > 0")
    op.drop_constraint('uq_operation_runs_run', 'operation_runs',
                       type_='unique')
    op.create_unique_constraint('uq_operation_runs_trigger_event_id_action_id_operation_id', 'operation_runs',
                                ['trigger_event_id', 'action_id', 'operation_id'])
    op.drop_column('operation_runs', 'repeat')
    op.execute(f"UPDATE operation_runs SET status = 'skipped' WHERE status NOT IN {OLD_STATUSES}")
    op.drop_constraint(op.f('ck_operation_runs_status'), 'operation_runs', type_='check')
    op.create_check_constraint(op.f('ck_operation_runs_status'), 'operation_runs', f"status IN {OLD_STATUSES}")
    op.drop_column('affiliates', 'protected')
