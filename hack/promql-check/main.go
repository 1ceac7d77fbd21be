// Command promql-check parses every PromQL expression that charts/shardop renders, with the
// parser Prometheus itself uses, so a typo in an alert or dashboard fails a test instead of
// a rule evaluation at 3 a.m.
//
// It reads a multi-document YAML stream (the output of `helm template`) on stdin and checks:
//
//   - PrometheusRule spec.groups[].rules[].expr (alerts and recording rules);
//   - every "expr" string inside JSON files of ConfigMaps (the Grafana dashboard), after
//     replacing Grafana's template variables with values that make them plain PromQL;
//   - every HorizontalPodAutoscaler-facing prometheus-adapter rule: the metricsQuery with its
//     Go-template placeholders substituted.
//
// It prints one line per checked expression and exits 1 if any of them fails to parse. With
// -metrics it prints, instead, the name of every metric the expressions select (one per
// line, sorted, recording rules excluded), so a test can check that the binaries export them.
package main

import (
	"bytes"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"os"
	"regexp"
	"sort"
	"strings"

	"github.com/prometheus/prometheus/promql/parser"
	"gopkg.in/yaml.v3"
)

type expression struct {
	origin string
	expr   string
}

func main() {
	listMetrics := flag.Bool("metrics", false, "print the metric names the expressions select instead of the check results")
	flag.Parse()
	exprs, err := collect(os.Stdin)
	if err != nil {
		fmt.Fprintf(os.Stderr, "promql-check: %v\n", err)
		os.Exit(2)
	}
	if len(exprs) == 0 {
		fmt.Fprintln(os.Stderr, "promql-check: no PromQL expressions found in the input")
		os.Exit(2)
	}
	// Default options: only the stable PromQL functions, as a stock Prometheus accepts them.
	p := parser.NewParser(parser.Options{})
	failed := 0
	names := map[string]bool{}
	for _, e := range exprs {
		ast, err := p.ParseExpr(e.expr)
		if err != nil {
			failed++
			fmt.Printf("FAIL %s: %v\n    %s\n", e.origin, err, e.expr)
			continue
		}
		parser.Inspect(ast, func(node parser.Node, _ []parser.Node) error {
			// Names with a colon are recording rules, computed by Prometheus, not exported.
			if vs, ok := node.(*parser.VectorSelector); ok && vs.Name != "" && !strings.Contains(vs.Name, ":") {
				names[vs.Name] = true
			}
			return nil
		})
		if !*listMetrics {
			fmt.Printf("ok   %s\n", e.origin)
		}
	}
	if *listMetrics && failed == 0 {
		sorted := make([]string, 0, len(names))
		for n := range names {
			sorted = append(sorted, n)
		}
		sort.Strings(sorted)
		for _, n := range sorted {
			fmt.Println(n)
		}
		return
	}
	fmt.Printf("%d expressions, %d failed\n", len(exprs), failed)
	if failed > 0 {
		os.Exit(1)
	}
}

func collect(r io.Reader) ([]expression, error) {
	var out []expression
	dec := yaml.NewDecoder(r)
	for {
		var doc map[string]any
		err := dec.Decode(&doc)
		if errors.Is(err, io.EOF) {
			break
		}
		if err != nil {
			return nil, fmt.Errorf("decoding YAML: %w", err)
		}
		if doc == nil {
			continue
		}
		kind, _ := doc["kind"].(string)
		name, _ := dig(doc, "metadata", "name").(string)
		switch kind {
		case "PrometheusRule":
			out = append(out, ruleExprs(name, doc)...)
		case "ConfigMap":
			data, _ := doc["data"].(map[string]any)
			keys := make([]string, 0, len(data))
			for k := range data {
				keys = append(keys, k)
			}
			sort.Strings(keys)
			for _, key := range keys {
				text, _ := data[key].(string)
				origin := fmt.Sprintf("ConfigMap %s %s", name, key)
				switch {
				case strings.HasSuffix(key, ".json"):
					found, err := dashboardExprs(origin, text)
					if err != nil {
						return nil, err
					}
					out = append(out, found...)
				case strings.HasSuffix(key, ".yaml"):
					found, err := adapterExprs(origin, text)
					if err != nil {
						return nil, err
					}
					out = append(out, found...)
				}
			}
		}
	}
	return out, nil
}

func dig(v any, path ...string) any {
	for _, p := range path {
		m, ok := v.(map[string]any)
		if !ok {
			return nil
		}
		v = m[p]
	}
	return v
}

func ruleExprs(name string, doc map[string]any) []expression {
	var out []expression
	groups, _ := dig(doc, "spec", "groups").([]any)
	for _, g := range groups {
		group, _ := g.(map[string]any)
		gname, _ := group["name"].(string)
		rules, _ := group["rules"].([]any)
		for _, r := range rules {
			rule, _ := r.(map[string]any)
			id, _ := rule["alert"].(string)
			if id == "" {
				id, _ = rule["record"].(string)
			}
			expr, _ := rule["expr"].(string)
			out = append(out, expression{fmt.Sprintf("PrometheusRule %s/%s/%s", name, gname, id), expr})
		}
	}
	return out
}

// Grafana variables are not PromQL: $__rate_interval and friends become a duration, and a
// label-value variable becomes a regular expression that matches anything.
var grafanaDuration = regexp.MustCompile(`\$__(rate_interval|interval|range)\b|\$\{__(rate_interval|interval|range)\}`)
var grafanaVariable = regexp.MustCompile(`\$\{?[A-Za-z_][A-Za-z0-9_]*(:[a-z]+)?\}?`)

func dashboardExprs(origin, text string) ([]expression, error) {
	var dashboard any
	if err := json.NewDecoder(bytes.NewBufferString(text)).Decode(&dashboard); err != nil {
		return nil, fmt.Errorf("%s is not valid JSON: %w", origin, err)
	}
	var out []expression
	var walk func(path string, v any)
	walk = func(path string, v any) {
		switch t := v.(type) {
		case map[string]any:
			title, _ := t["title"].(string)
			if title != "" {
				path = path + "/" + title
			}
			keys := make([]string, 0, len(t))
			for k := range t {
				keys = append(keys, k)
			}
			sort.Strings(keys)
			for _, k := range keys {
				if k == "expr" {
					if s, ok := t[k].(string); ok && s != "" {
						s = grafanaDuration.ReplaceAllString(s, "5m")
						s = grafanaVariable.ReplaceAllString(s, ".*")
						out = append(out, expression{origin + path, s})
					}
					continue
				}
				if k == "query" {
					// A templating query such as label_values(metric, label) is Grafana syntax.
					continue
				}
				walk(path, t[k])
			}
		case []any:
			for _, item := range t {
				walk(path, item)
			}
		}
	}
	walk("", dashboard)
	return out, nil
}

// prometheus-adapter rules: metricsQuery is a Go template over the series, its label
// matchers and the group-by labels.
func adapterExprs(origin, text string) ([]expression, error) {
	var cfg struct {
		Rules []struct {
			SeriesQuery  string `yaml:"seriesQuery"`
			MetricsQuery string `yaml:"metricsQuery"`
			Name         struct {
				As string `yaml:"as"`
			} `yaml:"name"`
		} `yaml:"rules"`
	}
	if err := yaml.Unmarshal([]byte(text), &cfg); err != nil {
		return nil, fmt.Errorf("%s is not valid YAML: %w", origin, err)
	}
	replacer := strings.NewReplacer(
		"<<.Series>>", "shardop_queue_depth",
		"<<.LabelMatchers>>", `namespace="shardop-system",pod="shardop-worker-0"`,
		"<<.GroupBy>>", "namespace,pod",
	)
	var out []expression
	for i, rule := range cfg.Rules {
		id := fmt.Sprintf("%s rule %d (%s)", origin, i, rule.Name.As)
		out = append(out, expression{id + " seriesQuery", rule.SeriesQuery})
		out = append(out, expression{id + " metricsQuery", replacer.Replace(rule.MetricsQuery)})
	}
	return out, nil
}
