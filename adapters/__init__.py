"""reflora.adapters"""
