"""initial schema

Revision ID: 0001
Revises: 
Create Date: 2026-11-28 04:19:19.769669
"""
from alembic import op
import sqlalchemy as sa


revision = '0001'
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table('actions',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('name', sa.Text(), nullable=False),
    sa.Column('active', sa.Boolean(), server_default=sa.text('true'), nullable=False),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_actions')),
    sa.UniqueConstraint('name', name=op.f('uq_actions_name'))
    )
    op.create_table('administrators',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('email', sa.Text(), nullable=False),
    sa.Column('active', sa.Boolean(), server_default=sa.text('true'), nullable=False),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_administrators')),
    sa.UniqueConstraint('email', name=op.f('uq_administrators_email'))
    )
    op.create_table('affiliate_users',
    sa.Column('id', sa.Integer(), autoincrement=False, nullable=False),
    sa.Column('affiliate_id', sa.Integer(), nullable=False),
    sa.Column('email', sa.Text(), nullable=True),
    sa.Column('status', sa.Text(), nullable=True),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_affiliate_users'))
    )
    op.create_index(op.f('ix_affiliate_users_affiliate_id'), 'affiliate_users', ['affiliate_id'], unique=False)
    op.create_table('affiliates',
    sa.Column('id', sa.Integer(), autoincrement=False, nullable=False),
    sa.Column('company', sa.Text(), nullable=True),
    sa.Column('account_manager_id', sa.Integer(), nullable=True),
    sa.Column('status', sa.Text(), nullable=True),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_affiliates'))
    )
    op.create_table('categories',
    sa.Column('id', sa.Integer(), autoincrement=False, nullable=False),
    sa.Column('name', sa.Text(), nullable=True),
    sa.Column('min_clicks', sa.Integer(), nullable=True),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_categories'))
    )
    op.create_table('conversion_caps',
    sa.Column('offer_id', sa.Integer(), nullable=False),
    sa.Column('affiliate_id', sa.Integer(), nullable=False),
    sa.Column('conversion_cap', sa.Integer(), nullable=False),
    sa.PrimaryKeyConstraint('offer_id', 'affiliate_id', name=op.f('pk_conversion_caps'))
    )
    op.create_table('employees',
    sa.Column('id', sa.Integer(), autoincrement=False, nullable=False),
    sa.Column('email', sa.Text(), nullable=True),
    sa.Column('secondary_email', sa.Text(), nullable=True),
    sa.Column('use_secondary', sa.Boolean(), server_default=sa.text('false'), nullable=False),
    sa.Column('status', sa.Text(), nullable=True),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_employees'))
    )
    op.create_table('goals',
    sa.Column('id', sa.Integer(), autoincrement=False, nullable=False),
    sa.Column('offer_id', sa.Integer(), nullable=False),
    sa.Column('name', sa.Text(), nullable=True),
    sa.Column('status', sa.Text(), nullable=True),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_goals'))
    )
    op.create_index(op.f('ix_goals_offer_id'), 'goals', ['offer_id'], unique=False)
    op.create_table('load_runs',
    sa.Column('id', sa.BigInteger(), nullable=False),
    sa.Column('request_event_id', sa.String(length=64), nullable=False),
    sa.Column('metric_key', sa.Text(), nullable=False),
    sa.Column('lookback_hours', sa.Integer(), nullable=False),
    sa.Column('schedule_slot', sa.DateTime(timezone=True), nullable=True),
    sa.Column('status', sa.Text(), nullable=False),
    sa.Column('measured_at', sa.DateTime(timezone=True), nullable=True),
    sa.Column('requested_at', sa.DateTime(timezone=True), server_default=sa.text('now()'), nullable=False),
    sa.Column('started_at', sa.DateTime(timezone=True), nullable=True),
    sa.Column('finished_at', sa.DateTime(timezone=True), nullable=True),
    sa.Column('rows_read', sa.Integer(), server_default=sa.text('0'), nullable=False),
    sa.Column('values_published', sa.Integer(), server_default=sa.text('0'), nullable=False),
    sa.Column('error', sa.Text(), nullable=True),
    sa.CheckConstraint("status IN ('requested', 'running', 'succeeded', 'failed')", name=op.f('ck_load_runs_status')),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_load_runs')),
    sa.UniqueConstraint('request_event_id', name=op.f('uq_load_runs_request_event_id'))
    )
    op.create_index('uq_load_runs_schedule_slot', 'load_runs', ['metric_key', 'schedule_slot'], unique=True, postgresql_where=sa.text('schedule_slot IS NOT NULL'))
    op.create_table('metrics',
    sa.Column('key', sa.Text(), nullable=False),
    sa.Column('title', sa.Text(), nullable=True),
    sa.PrimaryKeyConstraint('key', name=op.f('pk_metrics'))
    )
    op.create_table('offers',
    sa.Column('id', sa.Integer(), autoincrement=False, nullable=False),
    sa.Column('name', sa.Text(), nullable=True),
    sa.Column('status', sa.Text(), nullable=True),
    sa.Column('require_approval', sa.Boolean(), server_default=sa.text('false'), nullable=False),
    sa.Column('monitoring', sa.Boolean(), server_default=sa.text('true'), nullable=False),
    sa.Column('tracked_goal_id', sa.Integer(), nullable=True),
    sa.Column('min_clicks', sa.Integer(), nullable=True),
    sa.Column('min_conversions', sa.Integer(), nullable=True),
    sa.Column('updated_at', sa.DateTime(timezone=True), server_default=sa.text('now()'), nullable=False),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_offers'))
    )
    op.create_table('operations',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('name', sa.Text(), nullable=False),
    sa.Column('kind', sa.Text(), nullable=False),
    sa.Column('subject', sa.Text(), nullable=True),
    sa.Column('body', sa.Text(), nullable=True),
    sa.CheckConstraint("kind IN ('email_affiliate', 'email_affiliate_manager', 'email_administrators', 'approve_affiliate', 'reject_affiliate')", name=op.f('ck_operations_kind')),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_operations')),
    sa.UniqueConstraint('name', name=op.f('uq_operations_name'))
    )
    op.create_table('action_operations',
    sa.Column('action_id', sa.Integer(), nullable=False),
    sa.Column('operation_id', sa.Integer(), nullable=False),
    sa.ForeignKeyConstraint(['action_id'], ['actions.id'], name=op.f('fk_action_operations_action_id_actions'), ondelete='CASCADE'),
    sa.ForeignKeyConstraint(['operation_id'], ['operations.id'], name=op.f('fk_action_operations_operation_id_operations')),
    sa.PrimaryKeyConstraint('action_id', 'operation_id', name=op.f('pk_action_operations'))
    )
    op.create_table('metric_values',
    sa.Column('id', sa.BigInteger(), nullable=False),
    sa.Column('metric_key', sa.Text(), nullable=False),
    sa.Column('offer_id', sa.Integer(), nullable=False),
    sa.Column('affiliate_id', sa.Integer(), nullable=False),
    sa.Column('value', sa.Double(), nullable=False),
    sa.Column('measured_at', sa.DateTime(timezone=True), nullable=False),
    sa.Column('received_at', sa.DateTime(timezone=True), server_default=sa.text('now()'), nullable=False),
    sa.Column('event_id', sa.String(length=64), nullable=True),
    sa.ForeignKeyConstraint(['metric_key'], ['metrics.key'], name=op.f('fk_metric_values_metric_key_metrics')),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_metric_values')),
    sa.UniqueConstraint('metric_key', 'offer_id', 'affiliate_id', 'measured_at', name=op.f('uq_metric_values_metric_key_offer_id_affiliate_id_measured_at'))
    )
    op.create_table('offer_categories',
    sa.Column('offer_id', sa.Integer(), nullable=False),
    sa.Column('category_id', sa.Integer(), nullable=False),
    sa.ForeignKeyConstraint(['offer_id'], ['offers.id'], name=op.f('fk_offer_categories_offer_id_offers'), ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('offer_id', 'category_id', name=op.f('pk_offer_categories'))
    )
    op.create_index(op.f('ix_offer_categories_category_id'), 'offer_categories', ['category_id'], unique=False)
    op.create_table('triggers',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('name', sa.Text(), nullable=False),
    sa.Column('metric_key', sa.Text(), nullable=False),
    sa.Column('operator', sa.Text(), nullable=False),
    sa.Column('threshold', sa.Double(), nullable=True),
    sa.Column('active', sa.Boolean(), server_default=sa.text('true'), nullable=False),
    sa.CheckConstraint("operator IN ('lt', 'le', 'gt', 'ge', 'eq', 'ne')", name=op.f('ck_triggers_operator')),
    sa.ForeignKeyConstraint(['metric_key'], ['metrics.key'], name=op.f('fk_triggers_metric_key_metrics')),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_triggers')),
    sa.UniqueConstraint('name', name=op.f('uq_triggers_name'))
    )
    op.create_table('action_conditions',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('action_id', sa.Integer(), nullable=False),
    sa.Column('trigger_id', sa.Integer(), nullable=False),
    sa.Column('trigger_status', sa.Text(), nullable=False),
    sa.CheckConstraint("trigger_status IN ('OK', 'PROBLEM')", name=op.f('ck_action_conditions_trigger_status')),
    sa.ForeignKeyConstraint(['action_id'], ['actions.id'], name=op.f('fk_action_conditions_action_id_actions'), ondelete='CASCADE'),
    sa.ForeignKeyConstraint(['trigger_id'], ['triggers.id'], name=op.f('fk_action_conditions_trigger_id_triggers')),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_action_conditions'))
    )
    op.create_index(op.f('ix_action_conditions_trigger_id'), 'action_conditions', ['trigger_id'], unique=False)
    op.create_table('trigger_checks',
    sa.Column('id', sa.BigInteger(), nullable=False),
    sa.Column('trigger_id', sa.Integer(), nullable=False),
    sa.Column('offer_id', sa.Integer(), nullable=False),
    sa.Column('affiliate_id', sa.Integer(), nullable=False),
    sa.Column('value', sa.Double(), nullable=False),
    sa.Column('threshold', sa.Double(), nullable=False),
    sa.Column('status', sa.Text(), nullable=False),
    sa.Column('measured_at', sa.DateTime(timezone=True), nullable=False),
    sa.Column('checked_at', sa.DateTime(timezone=True), server_default=sa.text('now()'), nullable=False),
    sa.CheckConstraint("status IN ('OK', 'PROBLEM')", name=op.f('ck_trigger_checks_status')),
    sa.ForeignKeyConstraint(['trigger_id'], ['triggers.id'], name=op.f('fk_trigger_checks_trigger_id_triggers'), ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_trigger_checks')),
    sa.UniqueConstraint('trigger_id', 'offer_id', 'affiliate_id', 'measured_at', name=op.f('uq_trigger_checks_trigger_id_offer_id_affiliate_id_measured_at'))
    )
    op.create_table('trigger_events',
    sa.Column('id', sa.BigInteger(), nullable=False),
    sa.Column('trigger_id', sa.Integer(), nullable=False),
    sa.Column('offer_id', sa.Integer(), nullable=False),
    sa.Column('affiliate_id', sa.Integer(), nullable=False),
    sa.Column('previous_status', sa.Text(), nullable=True),
    sa.Column('status', sa.Text(), nullable=False),
    sa.Column('check_id', sa.BigInteger(), nullable=False),
    sa.Column('value', sa.Double(), nullable=True),
    sa.Column('threshold', sa.Double(), nullable=True),
    sa.Column('measured_at', sa.DateTime(timezone=True), nullable=False),
    sa.Column('created_at', sa.DateTime(timezone=True), server_default=sa.text('now()'), nullable=False),
    sa.CheckConstraint("previous_status IS NULL OR previous_status IN ('OK', 'PROBLEM')", name=op.f('ck_trigger_events_previous_status')),
    sa.CheckConstraint("status IN ('OK', 'PROBLEM')", name=op.f('ck_trigger_events_status')),
    sa.ForeignKeyConstraint(['trigger_id'], ['triggers.id'], name=op.f('fk_trigger_events_trigger_id_triggers'), ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_trigger_events')),
    sa.UniqueConstraint('check_id', name=op.f('uq_trigger_events_check_id'))
    )
    op.create_index('ix_trigger_events_pair', 'trigger_events', ['trigger_id', 'offer_id', 'affiliate_id'], unique=False)
    op.create_table('trigger_states',
    sa.Column('trigger_id', sa.Integer(), nullable=False),
    sa.Column('offer_id', sa.Integer(), nullable=False),
    sa.Column('affiliate_id', sa.Integer(), nullable=False),
    sa.Column('status', sa.Text(), nullable=False),
    sa.Column('since', sa.DateTime(timezone=True), nullable=False),
    sa.Column('measured_at', sa.DateTime(timezone=True), nullable=False),
    sa.Column('check_id', sa.BigInteger(), nullable=False),
    sa.Column('value', sa.Double(), nullable=True),
    sa.Column('threshold', sa.Double(), nullable=True),
    sa.Column('updated_at', sa.DateTime(timezone=True), server_default=sa.text('now()'), nullable=False),
    sa.CheckConstraint("status IN ('OK', 'PROBLEM')", name=op.f('ck_trigger_states_status')),
    sa.ForeignKeyConstraint(['trigger_id'], ['triggers.id'], name=op.f('fk_trigger_states_trigger_id_triggers'), ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('trigger_id', 'offer_id', 'affiliate_id', name=op.f('pk_trigger_states'))
    )
    op.create_table('trigger_thresholds',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('trigger_id', sa.Integer(), nullable=False),
    sa.Column('scope', sa.Text(), nullable=False),
    sa.Column('category_id', sa.Integer(), nullable=True),
    sa.Column('offer_id', sa.Integer(), nullable=True),
    sa.Column('affiliate_id', sa.Integer(), nullable=True),
    sa.Column('value', sa.Double(), nullable=False),
    sa.CheckConstraint("(scope = 'offer_category' AND category_id IS NOT NULL AND offer_id IS NULL AND affiliate_id IS NULL) OR (scope = 'offer' AND offer_id IS NOT NULL AND category_id IS NULL AND affiliate_id IS NULL) OR (scope = 'affiliate' AND affiliate_id IS NOT NULL AND category_id IS NULL AND offer_id IS NULL) OR (scope = 'offer_affiliate' AND offer_id IS NOT NULL AND affiliate_id IS NOT NULL AND category_id IS NULL)", name=op.f('ck_trigger_thresholds_scope_target')),
    sa.CheckConstraint("scope IN ('offer_category', 'offer', 'affiliate', 'offer_affiliate')", name=op.f('ck_trigger_thresholds_scope')),
    sa.ForeignKeyConstraint(['trigger_id'], ['triggers.id'], name=op.f('fk_trigger_thresholds_trigger_id_triggers'), ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_trigger_thresholds')),
    sa.UniqueConstraint('trigger_id', 'scope', 'category_id', 'offer_id', 'affiliate_id', name='uq_trigger_thresholds_target', postgresql_nulls_not_distinct=True)
    )
    op.create_table('operation_runs',
    sa.Column('id', sa.BigInteger(), nullable=False),
    sa.Column('trigger_event_id', sa.BigInteger(), nullable=False),
    sa.Column('action_id', sa.Integer(), nullable=False),
    sa.Column('operation_id', sa.Integer(), nullable=False),
    sa.Column('kind', sa.Text(), nullable=False),
    sa.Column('status', sa.Text(), nullable=False),
    sa.Column('attempts', sa.Integer(), server_default=sa.text('0'), nullable=False),
    sa.Column('last_error', sa.Text(), nullable=True),
    sa.Column('detail', sa.Text(), nullable=True),
    sa.Column('created_at', sa.DateTime(timezone=True), server_default=sa.text('now()'), nullable=False),
    sa.Column('started_at', sa.DateTime(timezone=True), nullable=True),
    sa.Column('finished_at', sa.DateTime(timezone=True), nullable=True),
    sa.CheckConstraint("status IN ('pending', 'succeeded', 'failed', 'skipped')", name=op.f('ck_operation_runs_status')),
    sa.ForeignKeyConstraint(['action_id'], ['actions.id'], name=op.f('fk_operation_runs_action_id_actions'), ondelete='CASCADE'),
    sa.ForeignKeyConstraint(['operation_id'], ['operations.id'], name=op.f('fk_operation_runs_operation_id_operations'), ondelete='CASCADE'),
    sa.ForeignKeyConstraint(['trigger_event_id'], ['trigger_events.id'], name=op.f('fk_operation_runs_trigger_event_id_trigger_events'), ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_operation_runs')),
    sa.UniqueConstraint('trigger_event_id', 'action_id', 'operation_id', name=op.f('uq_operation_runs_trigger_event_id_action_id_operation_id'))
    )
    metrics = sa.table("metrics", sa.column("key", sa.Text), sa.column("title", sa.Text))
    op.bulk_insert(metrics, [
        {"key": "cr", "title": "Conversion rate (conversions / clicks)"},
        {"key": "pacc", "title": "Profit after click cost"},
        {"key": "gtr", "title": "Goal to default conversion ratio"},
        {"key": "clicks_zero_conv", "title": "Clicks with zero conversions"},
        {"key": "cap_fill", "title": "Daily conversions / conversion cap"},
    ])


def downgrade() -> None:
    op.drop_table('operation_runs')
    op.drop_table('trigger_thresholds')
    op.drop_table('trigger_states')
    op.drop_index('ix_trigger_events_pair', table_name='trigger_events')
    op.drop_table('trigger_events')
    op.drop_table('trigger_checks')
    op.drop_index(op.f('ix_action_conditions_trigger_id'), table_name='action_conditions')
    op.drop_table('action_conditions')
    op.drop_table('triggers')
    op.drop_index(op.f('ix_offer_categories_category_id'), table_name='offer_categories')
    op.drop_table('offer_categories')
    op.drop_table('metric_values')
    op.drop_table('action_operations')
    op.drop_table('operations')
    op.drop_table('offers')
    op.drop_table('metrics')
    op.drop_index('uq_load_runs_schedule_slot', table_name='load_runs', postgresql_where=sa.text('schedule_slot IS NOT NULL'))
    op.drop_table('load_runs')
    op.drop_index(op.f('ix_goals_offer_id'), table_name='goals')
    op.drop_table('goals')
    op.drop_table('employees')
    op.drop_table('conversion_caps')
    op.drop_table('categories')
    op.drop_table('affiliates')
    op.drop_index(op.f('ix_affiliate_users_affiliate_id'), table_name='affiliate_users')
    op.drop_table('affiliate_users')
    op.drop_table('administrators')
    op.drop_table('actions')
