"""Kafka for the services: settings, the consumer and producer ports the services are written
against, the aiokafka implementation, an in-memory implementation for tests and the contract
tier, topic provisioning, and a reader that follows a topic without a consumer group."""

from infra.kafka.settings import KafkaSettings

__all__ = ["KafkaSettings"]
